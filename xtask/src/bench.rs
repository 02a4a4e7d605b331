//! `cargo xtask bench`: measurements that need the emulator, side by side in
//! one run. Wall times on Bochs are the emulator's, not a real CPU's; what
//! matters is the ratio of runs made the same way.

use std::time::Duration;

use crate::emulator::{self, Emulator};
use crate::image::{self, ModuleSpec};
use crate::linux;
use crate::scenarios;
use crate::util::{work_dir, Fail};

const MARKER: &str = "ctvm-init: started";

/// Linux to /init bare under Bochs against Linux under CTVM under Bochs.
pub fn linux_boot() -> Result<(), Fail> {
    let assets = linux::assets()?;
    let args = "console=ttyS0,115200 nokaslr quiet panic=-1 tpm_tis.interrupts=0";
    let bare = image::make_linux_iso("bench-bare-linux", &assets.kernel, &assets.initrd, args)?;
    let scenario = scenarios::find("linux-boot")?;
    let bins = image::build_all()?;
    let modules: Vec<ModuleSpec> = scenario.modules(&bins)?;
    let ctvm = image::make_iso("bench-ctvm-linux", &bins.hypervisor, "exit=bochs", &modules)?;
    let timeout = Duration::from_secs(600);
    let mut rows = Vec::new();
    for (name, iso) in [("bare", &bare), ("ctvm", &ctvm)] {
        println!("xtask: bench: booting Linux {name}");
        let out = emulator::boot(Emulator::Bochs, iso, &format!("bench-{name}"), 1024, timeout, Some(MARKER))?;
        let at =
            out.marker_at.ok_or_else(|| Fail(format!("{name}: no {MARKER:?} line; logs in {}", out.dir.display())))?;
        rows.push((name, at, out.elapsed, exits(&out.serial)));
    }
    println!("\n{:<6} {:>16} {:>16} {:>10}", "run", "to /init (s)", "power-off (s)", "VM exits");
    for (name, at, total, exits) in &rows {
        println!("{name:<6} {:>16.1} {:>16.1} {:>10}", at.as_secs_f64(), total.as_secs_f64(), exits.unwrap_or(0));
    }
    let ratio = rows[1].1.as_secs_f64() / rows[0].1.as_secs_f64();
    println!("ratio to /init, ctvm / bare: {ratio:.2} (logs in {})", work_dir().join("runs").display());
    Ok(())
}

fn exits(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("ctvm:   total "))
        .filter_map(|r| r.split_whitespace().last()?.parse().ok())
        .reduce(|a: u64, b| a + b)
}
