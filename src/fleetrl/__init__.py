"""fleetrl: post-train language models with RL and preference optimization on a Ray cluster."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Keep a local Ray on loopback. Ray 2.60 reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when `ray` is
# first imported; unset, a local Ray (gcs_server, raylet, dashboard agent, driver) listens on every
# interface. Every fleetrl entry point (`fleetrl`, `python -m fleetrl`, bench/, tests) imports this
# package before any module that imports ray, so setting it here is in time. The variable only
# changes which IP a NEW local Ray takes (127.0.0.1) and refuses `ray start --address` worker joins;
# joining a cluster through RAY_ADDRESS is left alone, and run.runtime.connect_ray undoes it when a
# config's ray.address names a cluster. A value the user exported wins.
LOOPBACK_ENV_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_loopback_set_here = False
if LOOPBACK_ENV_VAR not in _os.environ and not _os.environ.get("RAY_ADDRESS") and "ray" not in _sys.modules:
    _os.environ[LOOPBACK_ENV_VAR] = "0"
    _loopback_set_here = True
