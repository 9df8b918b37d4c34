//! One agent per instance: the instance lock, taken before anything else is
//! read or written; attaching the programs through pinned links (a restart
//! swaps the program inside the link, with no gap); and the explicit cleanup
//! that removes the pinned datapath.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp, XdpMode},
    Ebpf,
};
use tracing::{info, warn};

use crate::{
    api::InterfaceStatus,
    config::{Config, XdpModeSetting},
    datapath::Pins,
    nexthop::Resolver,
};

/// Where instance locks are.
const LOCK_DIR: &str = "/run/lb-agent";

/// The instance lock, held for the agent's life (released by the kernel when
/// the process ends, however it ends).
pub(crate) struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock of `instance`, or says which process holds it.
    pub(crate) fn take(instance: &str) -> Result<InstanceLock> {
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let path = Path::new(LOCK_DIR).join(format!("{instance}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "another agent runs instance {instance:?} (pid {}; lock {}): stop it first, or give this agent another `instance`",
                holder.trim(),
                path.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(InstanceLock { _file: file })
    }
}

/// The programs this configuration attaches, and where.
pub(crate) fn attachments(config: &Config) -> Vec<(&'static str, String, XdpModeSetting)> {
    let mut out = Vec::new();
    if let Some(b) = &config.balancer {
        let program = if b.datapath.bypass_source {
            "lb_source"
        } else {
            "lb_ingress"
        };
        for name in &b.datapath.interfaces {
            out.push((program, name.clone(), b.datapath.xdp_mode));
        }
    }
    if let Some(d) = &config.decap {
        for name in &d.interfaces {
            out.push(("lb_decap", name.clone(), d.xdp_mode));
        }
    }
    out
}

/// The link this instance pinned for `program` on `interface`, if it is the
/// one attached there now. A pin whose link is no longer attached (the
/// interface was recreated) is removed. Another program on the interface is
/// refused: another agent instance or tool owns it.
async fn own_link(
    pins: &Pins,
    resolver: &Resolver,
    program: &str,
    interface: &str,
) -> Result<Option<FdLink>> {
    let pin = pins.link(program, interface);
    adopt_sibling_link(pins, program, interface)?;
    let attached = resolver.xdp_program(interface).await?.map(|(id, _)| id);
    let pinned = match PinnedLink::from_pin(&pin) {
        Ok(p) => Some(FdLink::from(p)),
        Err(_) => None,
    };
    let pinned_prog = match &pinned {
        Some(l) => Some(l.info().context("reading a pinned link")?.program_id()),
        None => None,
    };
    match (pinned, attached) {
        (Some(link), Some(id)) if pinned_prog == Some(id) => Ok(Some(link)),
        (_, Some(id)) => bail!(
            "{interface} already has an XDP program (id {id}) that instance {:?} did not attach: another agent or tool owns it; stop it first",
            pins.dir().file_name().unwrap_or_default()
        ),
        (Some(_), None) => {
            warn!(interface, "a pinned link no longer attached: removed");
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

/// `lb_ingress` and `lb_source` take each other's place on an interface
/// when bypass is turned on or off: the link the other one pinned becomes
/// this program's, so the swap happens inside the kept link (one atomic
/// replacement, no moment without a program, flows kept).
fn adopt_sibling_link(pins: &Pins, program: &str, interface: &str) -> Result<()> {
    let sibling = match program {
        "lb_ingress" => "lb_source",
        "lb_source" => "lb_ingress",
        _ => return Ok(()),
    };
    let (pin, other) = (pins.link(program, interface), pins.link(sibling, interface));
    if !pin.exists() && other.exists() {
        std::fs::rename(&other, &pin)
            .with_context(|| format!("renaming {} to {}", other.display(), pin.display()))?;
        info!(
            interface,
            from = sibling,
            to = program,
            "the pinned link is kept: the program is swapped inside it"
        );
    }
    Ok(())
}

/// Refuses, before anything is loaded or written, interfaces that carry an
/// XDP program this instance did not attach.
pub(crate) async fn check_interfaces(
    config: &Config,
    pins: &Pins,
    resolver: &Resolver,
) -> Result<()> {
    for (program, interface, _) in attachments(config) {
        own_link(pins, resolver, program, &interface).await?;
    }
    Ok(())
}

/// Attaches every program: through this instance's pinned link when there is
/// one (the new program replaces the old one atomically), else with a new
/// link, pinned so that it outlives the agent.
pub(crate) async fn attach_all(
    ebpf: &mut Ebpf,
    config: &Config,
    pins: &Pins,
    resolver: &Resolver,
) -> Result<Vec<InterfaceStatus>> {
    let mut out = Vec::new();
    for (program, interface, mode) in attachments(config) {
        let link = own_link(pins, resolver, program, &interface).await?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .with_context(|| format!("the eBPF object has no program {program}"))?
            .try_into()?;
        let how: String = match link {
            Some(link) => {
                let link = XdpLink::try_from(link).context("the pinned link is not an XDP link")?;
                prog.attach_to_link(link)
                    .with_context(|| format!("replacing the program on {interface}"))?;
                kept_mode(resolver, &interface, mode).await?
            }
            None => {
                let attached = attach_new(prog, &interface, mode)?;
                let pin = pins.link(program, &interface);
                let link = FdLink::try_from(prog.take_link(attached.0)?)
                    .context("the kernel attached XDP without a bpf_link")?;
                link.pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                attached.1.to_string()
            }
        };
        info!(interface, program, how = %how, "attached");
        out.push(InterfaceStatus {
            name: interface,
            program: program.to_string(),
            mode: how,
        });
    }
    forget_other_links(config, pins)?;
    Ok(out)
}

/// The mode of a link kept over a restart, which a program swap cannot
/// change: a configured mode it does not match is warned about and shown in
/// the status (`generic, kept: configured native`).
async fn kept_mode(resolver: &Resolver, interface: &str, wanted: XdpModeSetting) -> Result<String> {
    let mode = resolver
        .xdp_program(interface)
        .await?
        .map_or("unknown", |(_, mode)| mode);
    let differs = match wanted {
        XdpModeSetting::Native => mode != "native",
        XdpModeSetting::Generic => mode != "generic",
        XdpModeSetting::NativeOrGeneric => false,
    };
    if !differs {
        return Ok(format!("{mode} (replaced in its link)"));
    }
    let wanted = match wanted {
        XdpModeSetting::Native => "native",
        _ => "generic",
    };
    warn!(
        interface,
        mode,
        configured = wanted,
        "the pinned link keeps its XDP mode: to change it, stop with `lbctl shutdown`, run `lb-agent --cleanup` (a short gap), then start again"
    );
    Ok(format!("{mode}, kept: configured {wanted}"))
}

/// Unpins the links of interfaces the configuration no longer names: their
/// programs detach once this agent's handles on the old object close.
fn forget_other_links(config: &Config, pins: &Pins) -> Result<()> {
    let wanted: Vec<PathBuf> = attachments(config)
        .iter()
        .map(|(program, interface, _)| pins.link(program, interface))
        .collect();
    let Ok(entries) = std::fs::read_dir(pins.dir().join("links")) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if !wanted.contains(&e.path()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            info!(link = %e.path().display(), "no longer configured: detached");
        }
    }
    Ok(())
}

fn attach_new(
    prog: &mut Xdp,
    interface: &str,
    mode: XdpModeSetting,
) -> Result<(aya::programs::xdp::XdpLinkId, &'static str)> {
    let attached = match mode {
        XdpModeSetting::Native => prog
            .attach(interface, XdpMode::Driver)
            .map(|l| (l, "native")),
        XdpModeSetting::Generic => prog.attach(interface, XdpMode::Skb).map(|l| (l, "generic")),
        XdpModeSetting::NativeOrGeneric => match prog.attach(interface, XdpMode::Driver) {
            Ok(l) => Ok((l, "native")),
            Err(e) => {
                warn!(
                    interface,
                    "native XDP unavailable ({e}); falling back to generic"
                );
                prog.attach(interface, XdpMode::Skb).map(|l| (l, "generic"))
            }
        },
    };
    attached.with_context(|| {
        format!(
            "attaching to {interface}: if its driver has no native XDP, set xdp_mode = \"generic\" or \"native-or-generic\"; if another XDP program is attached, `ip link set dev {interface} xdp off` removes it"
        )
    })
}

/// `lb-agent --cleanup`: with no agent running the instance, removes its
/// pinned datapath (the programs detach, the maps and the connection table
/// are freed) and its socket.
pub fn cleanup(config: &Config) -> Result<()> {
    let _lock = InstanceLock::take(&config.instance)?;
    let pins = Pins::new(&config.instance);
    let had = pins.exist();
    pins.remove()?;
    // The instance is gone: so is its lock file (held until we exit).
    let _ = std::fs::remove_file(Path::new(LOCK_DIR).join(format!("{}.lock", config.instance)));
    remove_stale_socket(&config.socket)?;
    if let Some(host) = &config.host {
        let inner = crate::config::host_instance(&config.instance);
        let _inner_lock = InstanceLock::take(&inner)?;
        super::host::cleanup(&config.instance, host)?;
        let _ = std::fs::remove_file(Path::new(LOCK_DIR).join(format!("{inner}.lock")));
    }
    info!(instance = config.instance, pinned = had, "cleaned up");
    Ok(())
}

/// Removes the socket file if it is a socket nobody serves. Anything else at
/// the path is left alone and refused.
pub(crate) fn remove_stale_socket(path: &PathBuf) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket: refusing to remove it (set `socket` elsewhere, or remove it)",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("another agent is serving {}", path.display());
    }
    std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))
}
