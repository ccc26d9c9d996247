from edgepack.cli import run

run()
