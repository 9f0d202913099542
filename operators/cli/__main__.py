"""``python -m operators.cli``: the `tuo` command, as `tuo run` starts its child processes."""

from operators.cli import main

main()
