"""One module per upstream behind one ``Upstream`` protocol (grows with the replication work)."""
