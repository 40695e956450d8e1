"""One module per `ttmm` subcommand: `add_parser(subparsers)` sets `func` to its runner."""
