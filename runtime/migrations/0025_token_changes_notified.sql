-- Intake keeps current API tokens in memory (producers.accounts.TokenCache), so a
-- request costs no look-up. Any change to a token (revocation) or to an office (its
-- name, which a token holder carries) tells every listening process to forget what it
-- holds, whoever made the change: `tuo tokens revoke`, another process or plain SQL.
-- A new token needs no notice: the cache never remembers a token it did not find.
CREATE FUNCTION notify_api_tokens_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tuo_api_tokens', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER api_token_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON api_token
    FOR EACH STATEMENT EXECUTE FUNCTION notify_api_tokens_changed();

CREATE TRIGGER registration_office_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON registration_office
    FOR EACH STATEMENT EXECUTE FUNCTION notify_api_tokens_changed();
