-- readings has no foreign key to meters (a per-row check would cost the bulk ingest path),
-- so a meter removed by any path, including the cascade from a deleted site, takes its
-- readings along here, once per statement.
CREATE FUNCTION delete_readings_of_deleted_meters() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM readings r USING deleted_meters d WHERE r.meter_id = d.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER meters_take_their_readings
    AFTER DELETE ON meters
    REFERENCING OLD TABLE AS deleted_meters
    FOR EACH STATEMENT
    EXECUTE FUNCTION delete_readings_of_deleted_meters();
