-- Supplier side: upstream sites and their contracts, and what partner sites need so that
-- their upstream_status follows the calendar (see service/upstream).
CREATE TABLE upstream_sites (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    -- Normalized like sites.grid_identifier; matched against partner sites' primary one.
    grid_identifier  text NOT NULL,
    country          text NOT NULL DEFAULT '',
    -- Decides "today" for the supplier's view of its contracts (the country's main zone).
    timezone         text NOT NULL,
    external_id      text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT upstream_sites_identifier_unique UNIQUE (org_id, grid_identifier)
);

CREATE INDEX upstream_sites_org_page_idx ON upstream_sites (org_id, created_at, id);
CREATE INDEX upstream_sites_page_idx ON upstream_sites (created_at, id);
-- Matching partner sites by identifier, across organizations.
CREATE INDEX upstream_sites_grid_identifier_idx ON upstream_sites (grid_identifier);

CREATE TABLE contracts (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The upstream site's organization, repeated so every query can scope by it directly.
    org_id              uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    upstream_site_id    uuid NOT NULL REFERENCES upstream_sites (id) ON DELETE CASCADE,
    -- Half-open: in force on start_date <= d < least(end_date, termination_date).
    start_date          date NOT NULL,
    end_date            date,
    requires_agreement  boolean NOT NULL,
    agreed_at           timestamptz,
    agreed_by           text,
    termination_date    date,
    terminated_at       timestamptz,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (end_date IS NULL OR end_date > start_date),
    CHECK ((agreed_at IS NULL) = (agreed_by IS NULL)),
    CHECK (agreed_at IS NULL OR requires_agreement),
    CHECK ((termination_date IS NULL) = (terminated_at IS NULL))
);

CREATE INDEX contracts_site_page_idx ON contracts (upstream_site_id, created_at, id);
CREATE INDEX contracts_org_idx ON contracts (org_id);

-- When the scheduler must next recompute the site's upstream_status (local midnight of the
-- next date on which a matching contract changes state); NULL = no date will change it.
ALTER TABLE sites ADD COLUMN upstream_next_check_at timestamptz;
CREATE INDEX sites_upstream_due_idx ON sites (upstream_next_check_at)
    WHERE upstream_next_check_at IS NOT NULL;

-- service.upstream.domain.contract_state in SQL, only for filtering lists by state; a test
-- checks both agree on every case. LEAST ignores NULLs: the earliest end that is set.
CREATE FUNCTION upstream_contract_state(
    start_date date, end_date date, termination_date date, requires_agreement boolean,
    agreed_at timestamptz, today date
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN least(end_date, termination_date) IS NOT NULL
            AND today >= least(end_date, termination_date) THEN 'inactive'
        WHEN requires_agreement AND agreed_at IS NULL THEN 'needs_agreement'
        WHEN today < start_date THEN 'pending'
        ELSE 'active'
    END
$$;

-- Precedence of service.upstream.domain.derive_upstream_status: lower ranks first.
CREATE FUNCTION upstream_contract_state_rank(state text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE state
        WHEN 'active' THEN 1 WHEN 'pending' THEN 2 WHEN 'needs_agreement' THEN 3 ELSE 4
    END
$$;
