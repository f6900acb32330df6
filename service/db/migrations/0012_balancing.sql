-- Balancing: meter settings and site policies (histories by date), and the results.
--
-- A BALANCED_* site may have no supply point (an energy-sharing community of meters): it
-- then has no grid identifier, matches no upstream site and is never dispatched. NULLs are
-- distinct in the (org_id, grid_identifier) unique constraint, so any number of them fit.
ALTER TABLE sites
    ALTER COLUMN grid_identifier DROP NOT NULL,
    ALTER COLUMN primary_direction DROP NOT NULL,
    ADD CONSTRAINT sites_without_supply_points_are_balanced CHECK (
        (grid_identifier IS NULL) = (primary_direction IS NULL)
        AND (grid_identifier IS NOT NULL
             OR (injection_grid_identifier IS NULL
                 AND site_type IN ('balanced_accurate', 'balanced_inaccurate')))
    );

-- Valid on start_date <= local day < end_date (NULL: open-ended). A meter's settings do
-- not overlap: checked by the store under a lock on the meter row.
CREATE TABLE meter_balancing_settings (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    site_id     uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    meter_id    uuid NOT NULL REFERENCES meters (id) ON DELETE CASCADE,
    balancing   text NOT NULL CHECK (balancing IN ('participant', 'excluded')),
    start_date  date NOT NULL,
    end_date    date CHECK (end_date IS NULL OR end_date > start_date),
    priority    integer CHECK (priority IS NULL OR priority >= 1),
    share       double precision CHECK (share IS NULL OR (share >= 0 AND share <= 1)),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX meter_balancing_settings_site_page_idx
    ON meter_balancing_settings (site_id, created_at, id);
CREATE INDEX meter_balancing_settings_meter_idx ON meter_balancing_settings (meter_id, start_date);

-- allocation_method: the proto numbers (1 EQUAL, 2 PRO_RATA, 3 STATIC, 4 STATIC_REDISTRIBUTED).
CREATE TABLE site_balancing_policies (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id             uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    site_id            uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    allocation_method  smallint NOT NULL CHECK (allocation_method BETWEEN 1 AND 4),
    start_date         date NOT NULL,
    end_date           date CHECK (end_date IS NULL OR end_date > start_date),
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX site_balancing_policies_site_page_idx
    ON site_balancing_policies (site_id, created_at, id);

-- One row per site and block: a local day for PT15M/PT1H sites, a local month for P1M ones.
-- A site-year of 100 consumers and 2 producers is ~10 million creditor -> debitor cells; a
-- row each would be ~1 GB of tuples and minutes to write or read. Here a block holds its
-- arrays packed (little-endian int64, C order, time innermost):
--   interval_starts [T] UTC microseconds of the balance grid points of the block
--   complete        [T] uint8, 1 = balanced, 0 = a participant's energy was missing
--   shared_wh       [C, P, T] producer -> consumer energy
--   feed_in_wh      [P, T], grid_supply_wh [C, T]
-- with producer_ids / consumer_ids the meter ids of the P and C axes (sorted). A site-year
-- is then 365 rows and ~60 MB, written with one COPY and read back with one query.
-- Stored uncompressed (EXTERNAL): pglz would cost more CPU than the bytes it saves here,
-- and an uncompressed value lets substring() fetch only the TOAST chunks of one consumer.
CREATE TABLE balance_blocks (
    site_id          uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    block_start      timestamptz NOT NULL,
    block_end        timestamptz NOT NULL CHECK (block_end > block_start),
    interval_starts  bytea NOT NULL,
    complete         bytea NOT NULL,
    producer_ids     uuid[] NOT NULL,
    consumer_ids     uuid[] NOT NULL,
    shared_wh        bytea NOT NULL,
    feed_in_wh       bytea NOT NULL,
    grid_supply_wh   bytea NOT NULL,
    -- The block's totals, so day and month reads need not fetch the intervals:
    -- shared_total_wh [C, P], feed_in_total_wh [P], grid_supply_total_wh [C], and how many
    -- of its intervals are complete.
    shared_total_wh       bytea NOT NULL,
    feed_in_total_wh      bytea NOT NULL,
    grid_supply_total_wh  bytea NOT NULL,
    complete_intervals    integer NOT NULL,
    balanced_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (site_id, block_start)
);

ALTER TABLE balance_blocks
    ALTER COLUMN shared_wh SET STORAGE EXTERNAL,
    ALTER COLUMN feed_in_wh SET STORAGE EXTERNAL,
    ALTER COLUMN grid_supply_wh SET STORAGE EXTERNAL,
    ALTER COLUMN interval_starts SET STORAGE EXTERNAL,
    ALTER COLUMN complete SET STORAGE EXTERNAL;

CREATE INDEX balance_blocks_org_idx ON balance_blocks (org_id);
-- The worker claims the oldest rows of one site at a time.
CREATE INDEX balancing_queue_site_idx ON balancing_queue (site_id, id);
