pytest_plugins = [
    "tests.plugins.broker",
    "tests.plugins.tcpproxy",
    "tests.plugins.emulator",
]
