from edgetok.cli import run

run()
