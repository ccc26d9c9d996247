"""Measure on real devices over SSH: a devices file, remote profile of a bundle, candidate timing for
pack --on, a fleet in parallel. Only the system OpenSSH client and Python on the device are needed."""
from __future__ import annotations

from .errors import PARTIAL_EXIT, ConnectionDropped, DeviceError
from .fleet import fleet_exit_code, pick_device, profile_on, time_on_device, time_on_devices
from .measure import check_device, profile_device
from .store import Device, devices_path, get_device, load_devices

__all__ = ["PARTIAL_EXIT", "ConnectionDropped", "Device", "DeviceError", "check_device", "devices_path",
           "fleet_exit_code", "get_device", "load_devices", "pick_device", "profile_device", "profile_on",
           "time_on_device", "time_on_devices"]
