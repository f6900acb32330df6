-- Partner sites and their flexible resources. Every row carries org_id: the storage layer
-- scopes every query by it.
CREATE TABLE sites (
    id                         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id                     uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name                       text NOT NULL DEFAULT '',
    external_id                text NOT NULL DEFAULT '',
    address                    text NOT NULL DEFAULT '',
    latitude                   double precision,
    longitude                  double precision,
    country                    text NOT NULL DEFAULT '',
    timezone                   text NOT NULL,
    -- The primary (bidirectional or offtake) supply point: matched against supplier sites.
    grid_identifier            text NOT NULL,
    primary_direction          text NOT NULL CHECK (primary_direction IN ('bidirectional', 'offtake')),
    injection_grid_identifier  text,
    site_type                  text,
    balance_resolution         text NOT NULL DEFAULT 'PT15M',
    paused                     boolean NOT NULL DEFAULT false,
    -- Kept in step with paused and the resources in the same transaction (see registry.store).
    status                     text NOT NULL DEFAULT 'no_resources',
    upstream_status            text NOT NULL DEFAULT 'no_upstream_registered',
    created_at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at                 timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT sites_primary_identifier_unique UNIQUE (org_id, grid_identifier),
    CHECK (primary_direction = 'offtake' OR injection_grid_identifier IS NULL)
);

-- Keyset pagination in creation order.
CREATE INDEX sites_org_page_idx ON sites (org_id, created_at, id);
-- Matching supplier sites by identifier, across organizations.
CREATE INDEX sites_grid_identifier_idx ON sites (grid_identifier);

CREATE TABLE resources (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    org_id            uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    site_id           uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    resource_type     text NOT NULL,
    name              text NOT NULL DEFAULT '',
    external_id       text NOT NULL DEFAULT '',
    power_min_kw      double precision,
    power_max_kw      double precision,
    capacity_min_kwh  double precision,
    capacity_max_kwh  double precision,
    webhook_url       text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX resources_site_page_idx ON resources (site_id, created_at, id);
CREATE INDEX resources_org_idx ON resources (org_id);
