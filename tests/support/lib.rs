//! What device-worker-ng's integration tests (`tests/*.rs`) share: their harness, the one
//! HTTPS skeleton and the test servers built on it, the real-binary agent runner, waiting,
//! reading a child's output line by line.

pub mod agent;
pub mod fake_kube;
pub mod flotta_server;
pub mod guest;
pub mod harness;
pub mod https;
pub mod lines;
pub mod podman;
pub mod wait;
