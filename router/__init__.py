"""The router: decide who is told what (a pure rule over subscriptions and
consent), and fan each life event out to agency topics exactly once."""
