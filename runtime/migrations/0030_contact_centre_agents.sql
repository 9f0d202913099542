-- Contact-centre agents: people who take an informant through the journey of
-- citizens.informants by telephone, on the informant's behalf. They sign in as registrars
-- do, but record nothing at the desk: their role opens only the telephone journey.
ALTER TABLE registrar DROP CONSTRAINT registrar_role_check;
ALTER TABLE registrar ADD CONSTRAINT registrar_role_check
    CHECK (role IN ('registrar', 'supervisor', 'agent'));

-- An informant's session that an agent opened on the telephone names the agent: what
-- is asked for in it is recorded as the informant's, by telephone, through that agent.
ALTER TABLE informant_session ADD COLUMN agent text REFERENCES registrar (username);
