-- Meters, their readings (partitioned by month, created ahead by the service), and the
-- durable queue of site balance intervals that need (re)balancing.
CREATE TABLE meters (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id              uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    site_id             uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    identifier          text NOT NULL,
    serial              text NOT NULL DEFAULT '',
    mpo                 text NOT NULL DEFAULT '',
    direction           text NOT NULL CHECK (direction IN ('consumer', 'producer', 'bidirectional')),
    measuring           text NOT NULL
        CHECK (measuring IN ('readings_accurate', 'load_profile_accurate', 'readings_inaccurate')),
    start_date          timestamptz NOT NULL,
    end_date            timestamptz CHECK (end_date IS NULL OR end_date > start_date),
    transformer_factor  double precision NOT NULL DEFAULT 1 CHECK (transformer_factor > 0),
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT meters_identifier_unique UNIQUE (site_id, identifier)
);

CREATE INDEX meters_site_page_idx ON meters (site_id, created_at, id);
CREATE INDEX meters_org_idx ON meters (org_id);

-- One row per (meter, flow, instant): a register value or an interval energy, as sent
-- (the kind follows from the meter's measuring, which never changes). flow: 1 import,
-- 2 export. ingest_id names the batch that last changed the row (negated when that change
-- was a correction), so watchers on every replica fetch exactly what one commit changed. No foreign key to meters: the check per
-- row would cost the bulk path; readings are only reached through their org's meters.
CREATE TABLE readings (
    meter_id   uuid NOT NULL,
    flow       smallint NOT NULL CHECK (flow IN (1, 2)),
    ts         timestamptz NOT NULL,
    value_wh   double precision NOT NULL,
    ingest_id  bigint NOT NULL,
    PRIMARY KEY (meter_id, flow, ts)
) PARTITION BY RANGE (ts);

CREATE SEQUENCE reading_ingest_seq;

-- What the balancing step consumes: site intervals (start on the site's balance grid)
-- whose readings changed. Append-only, written in the ingest transaction: concurrent
-- batches of one site never wait on each other's queue rows. The consumer claims rows
-- (DELETE ... WHERE id IN (SELECT id ... FOR UPDATE SKIP LOCKED) RETURNING site_id,
-- interval_start), deduplicates, and rebalances each interval once; a change committed
-- after its claim appends a new row, so nothing is missed.
CREATE TABLE balancing_queue (
    id              bigserial PRIMARY KEY,
    site_id         uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    interval_start  timestamptz NOT NULL,
    enqueued_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX balancing_queue_interval_idx ON balancing_queue (site_id, interval_start);
