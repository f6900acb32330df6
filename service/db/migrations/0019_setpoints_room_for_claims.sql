-- A claim takes the due setpoints in the order they were written, so it rewrites whole pages
-- at a time. At fillfactor 70 fewer than half of a page's rows found room there for their
-- claimed version: the rest were updates with a new entry in every index, and longer chains
-- for every later lookup by id (the record's, the next claim's). At 50, 95 % of the claims
-- in loadtest/dispatch_bench.py are HOT updates (46 % before), and a claimed row costs the
-- database about 31 us instead of 63-67 (pg_stat_statements); the table takes more pages
-- for the same rows. It applies to pages written from now on.
ALTER TABLE setpoints SET (fillfactor = 50);
