from edgepack.devices.cli import app

app(prog_name="edgepack devices")
