"""Every `kdas` command, one module per command group (promote and rollback share one, the
data and train groups are one module each): thin, they parse, call the feature package and
print. kdas/cli.py imports a command's module only when it runs, so a DVC stage depends on
its own command's code."""
