"""The command line's control-plane commands: argument parsing and printing only.

Each module registers its commands (`register(subparsers)`) on the parser that `ipab.cli`
builds. Nothing else imports this package: what a command does lives in the batch layer
and the features below it. A module's top-level imports are light (what its parsers show);
each command imports the rest when it runs, so `ipab --help` loads no database or S3 code.
"""
