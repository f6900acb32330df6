-- Flexibility dispatch: a dispatch (an operator's request), its setpoints (one per resource of
-- an eligible partner site) and their delivery attempts. The setpoints table is also the
-- durable outbox of the delivery workers (see service/dispatch/store.py).
CREATE TABLE dispatches (
    id                        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The operator organization that made the dispatch: its scope.
    org_id                    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    request_id                text NOT NULL,
    -- Digest of the canonical request: a retry with another request is told apart.
    request_digest            text NOT NULL,
    power_kw                  double precision NOT NULL,
    start_time                timestamptz NOT NULL,
    end_time                  timestamptz NOT NULL,
    dispatch_type             text NOT NULL,
    selection_site_ids        uuid[] NOT NULL DEFAULT '{}',
    selection_org_id          uuid,
    selection_resource_types  text[] NOT NULL DEFAULT '{}',
    allocated_power_kw        double precision NOT NULL,
    shortfall_power_kw        double precision NOT NULL,
    eligible_site_count       integer NOT NULL,
    ineligible_site_count     integer NOT NULL,
    cancelled_at              timestamptz,
    -- W3C traceparent the deliveries continue (the caller's trace, or one made for it).
    traceparent               text,
    created_at                timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Idempotency of DispatchFlexibility: the constraint, not a check-then-insert, decides.
    CONSTRAINT dispatches_request_id_unique UNIQUE (org_id, request_id)
);

CREATE INDEX dispatches_org_page_idx ON dispatches (org_id, created_at, id);

CREATE TABLE setpoints (
    id                          uuid PRIMARY KEY,
    dispatch_id                 uuid NOT NULL REFERENCES dispatches (id) ON DELETE CASCADE,
    -- The dispatching operator and the site's partner: the two scopes that may read it.
    operator_org_id             uuid NOT NULL,
    partner_org_id              uuid NOT NULL,
    -- No foreign keys to sites/resources: a setpoint outlives a deleted site (it then
    -- becomes NOT_ELIGIBLE), and its history is kept.
    site_id                     uuid NOT NULL,
    resource_id                 uuid NOT NULL,
    power_kw                    double precision NOT NULL,
    start_time                  timestamptz NOT NULL,
    end_time                    timestamptz NOT NULL,
    state                       text NOT NULL DEFAULT 'pending',
    reason                      text NOT NULL DEFAULT '',
    attempt_count               integer NOT NULL DEFAULT 0,
    -- Outbox: when the next delivery (of the setpoint or its cancellation) is due; NULL when
    -- nothing is left to deliver.
    next_attempt_at             timestamptz,
    -- A claim: the worker that holds it and until when. An expired lease is reclaimed.
    lease_owner                 uuid,
    lease_expires_at            timestamptz,
    -- CancelDispatch: when asked; then the cancellation delivery of an ACCEPTED setpoint.
    cancel_requested_at         timestamptz,
    cancellation_state          text CHECK (cancellation_state IN ('pending', 'delivered', 'failed')),
    cancellation_attempt_count  integer NOT NULL DEFAULT 0,
    created_at                  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at                  timestamptz NOT NULL DEFAULT clock_timestamp()
-- Room on each page, so that a claim or a lease renewal (no indexed column changes) is a HOT
-- update instead of a new entry in every index.
) WITH (fillfactor = 70);

-- What the workers claim: only rows with something to deliver are in it.
CREATE INDEX setpoints_due_idx ON setpoints (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX setpoints_dispatch_page_idx ON setpoints (dispatch_id, created_at, id);
CREATE INDEX setpoints_operator_page_idx ON setpoints (operator_org_id, created_at, id);
CREATE INDEX setpoints_partner_page_idx ON setpoints (partner_org_id, created_at, id);
CREATE INDEX setpoints_site_idx ON setpoints (site_id);

CREATE TABLE setpoint_attempts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    setpoint_id   uuid NOT NULL REFERENCES setpoints (id) ON DELETE CASCADE,
    attempt_time  timestamptz NOT NULL,
    cancellation  boolean NOT NULL DEFAULT false,
    http_status   integer,
    error         text NOT NULL DEFAULT '',
    latency_ms    double precision NOT NULL
);

CREATE INDEX setpoint_attempts_setpoint_idx ON setpoint_attempts (setpoint_id, id);
