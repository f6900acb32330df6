-- A dispatch writes its setpoints in one statement (10,000 and more). A foreign key checks
-- every row on its own (a lookup and a KEY SHARE lock each, all of the same dispatch): a
-- quarter of a 10,000-setpoint dispatch's insert. These triggers keep the key's rules,
-- checked once per statement for the few distinct dispatches its rows refer to.
--
-- setpoint_attempts keeps its foreign key: each attempt refers to another setpoint, and the
-- same check per statement (tried) cost more per row than the key's own.
--
-- The lookups go through an id array: a transition table has no statistics, and a join to
-- it (IN (SELECT ...)) can be planned as a scan of the whole referenced table.
ALTER TABLE setpoints DROP CONSTRAINT setpoints_dispatch_id_fkey;

-- Every new setpoint's dispatch exists, and is locked FOR KEY SHARE (as a foreign key locks
-- it) until the transaction ends, so that it cannot be deleted under its new setpoints.
CREATE FUNCTION setpoints_have_their_dispatch() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    referenced uuid[];
    found bigint;
BEGIN
    referenced := ARRAY(SELECT DISTINCT dispatch_id FROM new_setpoints);
    SELECT count(*) INTO found FROM (
        SELECT 1 FROM dispatches WHERE id = ANY (referenced) FOR KEY SHARE
    ) locked;
    IF found < cardinality(referenced) THEN
        RAISE foreign_key_violation USING
            MESSAGE = 'a setpoint refers to a dispatch that does not exist',
            TABLE = 'setpoints', COLUMN = 'dispatch_id';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER setpoints_have_their_dispatch AFTER INSERT ON setpoints
    REFERENCING NEW TABLE AS new_setpoints
    FOR EACH STATEMENT EXECUTE FUNCTION setpoints_have_their_dispatch();

-- ON DELETE CASCADE, per statement: a deleted dispatch (its operator organization deleted)
-- takes its setpoints, and they their attempts (by the attempts' foreign key).
CREATE FUNCTION dispatches_delete_their_setpoints() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM setpoints WHERE dispatch_id = ANY (ARRAY(SELECT id FROM old_dispatches));
    RETURN NULL;
END;
$$;

CREATE TRIGGER dispatches_delete_their_setpoints AFTER DELETE ON dispatches
    REFERENCING OLD TABLE AS old_dispatches
    FOR EACH STATEMENT EXECUTE FUNCTION dispatches_delete_their_setpoints();

-- Neither end of the reference changes (a foreign key would refuse it, too).
CREATE FUNCTION refuse_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE foreign_key_violation USING
        MESSAGE = format('%s.%s cannot change', TG_TABLE_NAME, TG_ARGV[0]),
        TABLE = TG_TABLE_NAME, COLUMN = TG_ARGV[0];
END;
$$;

CREATE TRIGGER dispatches_id_is_fixed BEFORE UPDATE OF id ON dispatches
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE FUNCTION refuse_key_change('id');
CREATE TRIGGER setpoints_dispatch_id_is_fixed BEFORE UPDATE OF dispatch_id ON setpoints
    FOR EACH ROW WHEN (OLD.dispatch_id IS DISTINCT FROM NEW.dispatch_id)
    EXECUTE FUNCTION refuse_key_change('dispatch_id');
