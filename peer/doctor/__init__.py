"""`crowdtrain doctor`: a volunteer's machine checked before it joins, one verdict per check.

command.py   the command: gathers, judges, prints one aligned line per check (or --json); exit status
measure.py   what it measures: torch, memory, disk, and what a coordinator answers before any session
verdicts.py  the checks, pure: torch build vs hardware, memory vs presets, disk, coordinator, clock
"""
