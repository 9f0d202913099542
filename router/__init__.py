"""Who is told what: the routing rule over subscriptions and consent, sensitive-domain
policy, minimisation, the per-event plan shared by the router and replay, the
exactly-once Kafka service, telling agencies of withdrawals, consent receipts, the
hash-chained decision record, and the receipt tracker that closes each delivery."""
