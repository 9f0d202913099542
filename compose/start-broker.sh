#!/bin/sh
# Starts one broker (and controller) of the Compose cluster in the apache/kafka image.
#
# The image's own start-up formats the storage without SCRAM credentials, and a cluster
# that only takes SCRAM logins would then have nobody to let in. So this script:
#   1. writes server.properties from the KAFKA_* variables, by the image's convention
#      (KAFKA_FOO_BAR is foo.bar, __ stands for _ and ___ for -), plus the keystore
#      password from /etc/kafka/tls and the super user's SCRAM password from
#      /etc/kafka/credentials (both made by the `secrets` service), which stay out of
#      the environment;
#   2. writes client.properties for the healthcheck: User:broker over SASL_SSL;
#   3. on first start only, formats the storage with the salted SCRAM credentials of
#      the super user and the bus's components (--add-scram);
#   4. runs the broker.
# Both files go to /run/kafka, a tmpfs, readable only by the broker's user.
set -eu
umask 077

TLS=/etc/kafka/tls
CREDENTIALS=/etc/kafka/credentials
CONFIG=/run/kafka
BIN=/opt/kafka/bin
SUPER_USER=broker

for file in "$TLS/ca.pem" "$TLS/keystore-password" "$CREDENTIALS/broker-password" \
    "$CREDENTIALS/scram-credentials"; do
    if [ ! -r "$file" ]; then
        echo "start-broker: cannot read $file as uid $(id -u); the secrets service writes it" \
            "for the uid given as its --broker-uid" >&2
        exit 1
    fi
done

# Variables the Kafka scripts read for themselves, not broker properties.
not_a_property() {
    case "$1" in
        KAFKA_HEAP_OPTS | KAFKA_OPTS | KAFKA_JMX_OPTS | KAFKA_JMX_PORT | KAFKA_LOG4J_OPTS | \
            KAFKA_JVM_PERFORMANCE_OPTS | KAFKA_GC_LOG_OPTS | KAFKA_DEBUG | KAFKA_LOG_DIR | \
            KAFKA_VERSION | KAFKA_HOME) return 0 ;;
    esac
    return 1
}

properties_from_environment() {
    for name in $(env | sed -n 's/^\(KAFKA_[A-Z0-9_]*\)=.*/\1/p' | sort); do
        not_a_property "$name" && continue
        key=$(printf '%s' "${name#KAFKA_}" | tr 'A-Z' 'a-z' |
            sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' -e 's/@/_/g')
        printf '%s=%s\n' "$key" "$(printenv "$name")"
    done
}

keystore_password=$(cat "$TLS/keystore-password")
login="org.apache.kafka.common.security.scram.ScramLoginModule required\
 username=\"$SUPER_USER\" password=\"$(cat "$CREDENTIALS/broker-password")\";"

mkdir -p "$CONFIG"
{
    properties_from_environment
    echo "ssl.keystore.password=$keystore_password"
    echo "ssl.key.password=$keystore_password"
    # The brokers' own login, between themselves over the SASL_SSL listener.
    echo "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=$login"
} >"$CONFIG/server.properties"
{
    echo "security.protocol=SASL_SSL"
    echo "sasl.mechanism=SCRAM-SHA-512"
    echo "sasl.jaas.config=$login"
    echo "ssl.truststore.type=PEM"
    echo "ssl.truststore.location=$TLS/ca.pem"
} >"$CONFIG/client.properties"

data=$(printenv KAFKA_LOG_DIRS)
if [ ! -e "$data/meta.properties" ]; then
    set --
    while IFS= read -r record; do
        [ -n "$record" ] && set -- "$@" --add-scram "$record"
    done <"$CREDENTIALS/scram-credentials"
    # Its output lists the records it writes, salted keys included: not for the logs.
    "$BIN/kafka-storage.sh" format --cluster-id="$CLUSTER_ID" --config "$CONFIG/server.properties" \
        "$@" >/dev/null
    echo "start-broker: formatted $data with the SCRAM credentials of $(($# / 2)) users"
fi

exec "$BIN/kafka-server-start.sh" "$CONFIG/server.properties"
