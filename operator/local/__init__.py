"""Running the system's real parts as local processes on 127.0.0.1 (local mode and tests)."""
