from edgepack.cli import app

app(prog_name="edgepack")
