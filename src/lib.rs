//! device-worker-ng: the Flotta edge device agent.
