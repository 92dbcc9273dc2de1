"""Light command modules for `hpctrain COMMAND`: their options and a `run` that imports the heavy
code (torch) only when the command runs, so `hpctrain COMMAND --help` answers at once."""
