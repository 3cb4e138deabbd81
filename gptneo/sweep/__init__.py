"""Sweeps: many bin/train runs from gin overrides, compared in one table and one plot.

spec.py (what a sweep is, its points and their names), sweep_file.py (gin/sweeps/*.gin and
the flags), validate.py (each point through bin/train's checks), root.py (the sweep's
folder), runner.py (running, resuming, retrying), metrics.py (what a run wrote),
report.py (results.csv/md, loss.png, scaling.png, the HParams summary), launch.py
(--print_commands, --launcher=slurm), driver.py (what bin/sweep does).
"""
