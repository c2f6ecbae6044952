"""The `lorakit` command line."""
