"""The wire contract between the ServerApp and the ClientApp: message types, record names,
typed requests and replies (`messages`), and end-to-end sealing of peer payloads (`sealing`)."""
