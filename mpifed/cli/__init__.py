"""The `mpifed` command line: main.py holds the group and its one table of commands; train.py (simulate,
run), data.py, ckpt.py and deploy.py (sites, config new) hold the commands; common.py what they share."""
