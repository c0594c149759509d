"""Subcommands of `lmforge`, one module per group; each module has `register(commands, groups)`.

`commands` is the top-level subparsers object (`lmforge NAME`); `groups` maps a group name ("data",
"tokenizer") to its own subparsers (`lmforge data NAME`). A handler is a thin function that parses its
arguments and calls the library; errors are ValueError / FileNotFoundError with a one-line message.
"""
