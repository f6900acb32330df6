-- Webhook signing secrets (Standard Webhooks: "whsec_" + base64 of random bytes), one per
-- organization. The column default makes one for every organization, however it is created,
-- and for every existing one now (a volatile default is evaluated per row). Two UUIDs v4 give
-- 32 bytes of which 244 bits come from PostgreSQL's strong random source; rotations are made
-- in Python (service/auth/signing.py). A rotation keeps the previous secret, which signs too
-- until signing_secret_rotated_at + OPENVPP_DISPATCH_SIGNING_SECRET_GRACE_SECONDS.
ALTER TABLE organizations
    ADD COLUMN signing_secret text NOT NULL DEFAULT (
        'whsec_' || encode(
            decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'),
            'base64'
        )
    ),
    ADD COLUMN previous_signing_secret text,
    ADD COLUMN signing_secret_rotated_at timestamptz,
    ADD CONSTRAINT organizations_signing_secret_format CHECK (signing_secret LIKE 'whsec\_%'),
    ADD CONSTRAINT organizations_previous_with_rotation CHECK (
        (previous_signing_secret IS NULL) = (signing_secret_rotated_at IS NULL)
    );
