-- 0003's copy of service.upstream.domain.contract_state missed one case of its first rule: a
-- contract whose effective end is on or before its start date (terminated before it
-- started) will never be in force, so it is inactive at once, not pending until that end.
-- The signature and volatility stay those of 0003, so the store's queries are unchanged.
CREATE OR REPLACE FUNCTION upstream_contract_state(
    start_date date, end_date date, termination_date date, requires_agreement boolean,
    agreed_at timestamptz, today date
) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN least(end_date, termination_date) IS NOT NULL
            AND (today >= least(end_date, termination_date)
                OR least(end_date, termination_date) <= start_date) THEN 'inactive'
        WHEN requires_agreement AND agreed_at IS NULL THEN 'needs_agreement'
        WHEN today < start_date THEN 'pending'
        ELSE 'active'
    END
$$;
