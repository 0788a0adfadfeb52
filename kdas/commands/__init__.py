"""The `kdas` commands of their own: one module each (promote and rollback share one). The
data and training groups live in their packages (kdas/data/commands.py,
kdas/training/command.py). kdas/cli.py imports a command's module only when it runs, so a
DVC stage depends on its own command's code."""
