"""gRPC stubs generated from proto/ at build time (see agent.api.build); never edited by hand."""
