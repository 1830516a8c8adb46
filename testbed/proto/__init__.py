"""Python stubs generated from protos/*.proto by testbed.protogen (never edited by hand, not committed).

Importing this package regenerates stale stubs first, so code never runs against
stubs that disagree with the .proto files it ships with.
"""

from testbed import protogen as _protogen

_protogen.ensure()
