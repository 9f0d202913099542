#!/bin/sh
# The `setup` service: Kafka access for the bus, once the brokers are up.
#
#   setup-bus.sh --reference-agencies AGENCY...
#       1. `tuo access grant` as the super user (User:broker): the components' ACLs
#          (their SCRAM users were created when the brokers formatted their storage);
#       2. `tuo agencies add` as tuo-operator for each reference agency not onboarded
#          yet: its principal, ACLs and topics (the first one also creates the bus's
#          shared topics), its password stored for the `agencies` container only.
#   setup-bus.sh COMMAND...
#       runs COMMAND as tuo-operator, e.g. `tuo agencies add council-york` (which then
#       prints the agency's password once) or `tuo access show`.
set -eu

SECRETS=/etc/tuo/setup
AGENCIES_CREDENTIALS=/etc/tuo/agencies/credentials.json

TUO_KAFKA_SASL_USERNAME=tuo-operator
TUO_KAFKA_SASL_PASSWORD=$(cat "$SECRETS/operator-password")
export TUO_KAFKA_SASL_USERNAME TUO_KAFKA_SASL_PASSWORD

if [ "${1-}" != "--reference-agencies" ]; then
    exec "$@"
fi
shift

TUO_KAFKA_SASL_USERNAME=broker TUO_KAFKA_SASL_PASSWORD=$(cat "$SECRETS/broker-password") \
    tuo access grant

for agency in "$@"; do
    if grep -q "\"agency-$agency\"" "$AGENCIES_CREDENTIALS"; then
        echo "setup: $agency is onboarded already"
        continue
    fi
    # An agency with an account but no stored password (its volume was recreated, or an
    # operator suspended it) is left for an operator: `tuo agencies add X --reinstate`.
    TUO_KAFKA_CREDENTIALS_FILE=$AGENCIES_CREDENTIALS tuo agencies add "$agency" --by compose-setup ||
        echo "setup: $agency not onboarded (see above); its consumer will not start"
done
