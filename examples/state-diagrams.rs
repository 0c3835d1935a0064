//! Writes `state-diagrams/*.md` from the machines' computed transition tables.
//! `cargo run --example state-diagrams` after changing a machine; a test checks they match.

use device_worker_ng::machines::{device, diagram_document, session, workload};

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("state-diagrams");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("device.md"),
        diagram_document("Device machine", "registering", &device::transition_table()),
    )?;
    std::fs::write(
        dir.join("workload.md"),
        diagram_document("Workload machine", "pending", &workload::transition_table()),
    )?;
    std::fs::write(
        dir.join("session.md"),
        diagram_document("Session machine", "starting", &session::transition_table()),
    )?;
    if std::env::args().any(|a| a == "--table") {
        for r in workload::transition_table()
            .iter()
            .chain(device::transition_table().iter())
            .chain(session::transition_table().iter())
        {
            println!(
                "{:24} {:34} {:12} {}",
                r.from,
                r.event,
                r.to,
                r.commands.join(",")
            );
        }
    }
    Ok(())
}
