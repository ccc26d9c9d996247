"""Imported last by the timing workers' fork server: freeze what it loaded, so forks copy less."""
import gc

gc.freeze()
