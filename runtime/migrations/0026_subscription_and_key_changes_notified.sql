-- Intake keeps, besides API tokens (0025), the agencies that take consent per event
-- type and each office's active signing key in memory (runtime.notices), so a request
-- costs no look-up. Any change to a subscription or a signing key (`tuo subscriptions`,
-- `tuo offices rotate-key`, another process, plain SQL) tells every listening process to
-- forget what it holds of it.
CREATE FUNCTION notify_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

CREATE TRIGGER subscription_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON subscription
    FOR EACH STATEMENT EXECUTE FUNCTION notify_changed('tuo_subscriptions');

CREATE TRIGGER office_signing_key_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON office_signing_key
    FOR EACH STATEMENT EXECUTE FUNCTION notify_changed('tuo_office_keys');

-- One notifying function for every cache: 0025's token triggers move onto it.
DROP TRIGGER api_token_changed ON api_token;
DROP TRIGGER registration_office_changed ON registration_office;
DROP FUNCTION notify_api_tokens_changed();

CREATE TRIGGER api_token_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON api_token
    FOR EACH STATEMENT EXECUTE FUNCTION notify_changed('tuo_api_tokens');

CREATE TRIGGER registration_office_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON registration_office
    FOR EACH STATEMENT EXECUTE FUNCTION notify_changed('tuo_api_tokens');
