-- created_at and updated_at both defaulted to clock_timestamp(), which PostgreSQL evaluates
-- once per column: a new row's update_time came out microseconds after its create_time.
-- A row that was never changed carries one time in both.
CREATE FUNCTION updated_when_created() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := NEW.created_at;
    RETURN NEW;
END;
$$;

CREATE TRIGGER sites_updated_when_created BEFORE INSERT ON sites
    FOR EACH ROW EXECUTE FUNCTION updated_when_created();
CREATE TRIGGER resources_updated_when_created BEFORE INSERT ON resources
    FOR EACH ROW EXECUTE FUNCTION updated_when_created();
CREATE TRIGGER upstream_sites_updated_when_created BEFORE INSERT ON upstream_sites
    FOR EACH ROW EXECUTE FUNCTION updated_when_created();
CREATE TRIGGER contracts_updated_when_created BEFORE INSERT ON contracts
    FOR EACH ROW EXECUTE FUNCTION updated_when_created();
CREATE TRIGGER meters_updated_when_created BEFORE INSERT ON meters
    FOR EACH ROW EXECUTE FUNCTION updated_when_created();
