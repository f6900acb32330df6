-- The balancing queue names what its consumer needs to claim and scope a row: the owning
-- organization, and the time range [interval_start, interval_end) of the site's balance grid
-- whose balances must be recomputed (one balance interval for a reading, many for a change
-- of a setting, a meter or the site's grid).
ALTER TABLE balancing_queue
    ADD COLUMN org_id uuid REFERENCES organizations (id) ON DELETE CASCADE,
    ADD COLUMN interval_end timestamptz;

UPDATE balancing_queue q
SET org_id = s.org_id,
    interval_end = CASE s.balance_resolution
        WHEN 'PT15M' THEN q.interval_start + interval '15 minutes'
        WHEN 'PT1H' THEN q.interval_start + interval '1 hour'
        ELSE ((q.interval_start AT TIME ZONE s.timezone) + interval '1 month') AT TIME ZONE s.timezone
    END
FROM sites s
WHERE s.id = q.site_id;

ALTER TABLE balancing_queue
    ALTER COLUMN org_id SET NOT NULL,
    ALTER COLUMN interval_end SET NOT NULL,
    ADD CONSTRAINT balancing_queue_range_check CHECK (interval_end > interval_start);

CREATE INDEX balancing_queue_org_idx ON balancing_queue (org_id);
