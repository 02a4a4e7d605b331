//! Command-line options, spelled as swtpm's `socket` options so that scripts
//! written for swtpm can start this server by changing the program name:
//!
//! ```text
//! vtpm-server [socket] --tpmstate dir=D --server [type=tcp,]port=P[,bindaddr=A]
//!             --ctrl type=tcp,port=P[,bindaddr=A] [--flags not-need-init,startup-clear]
//!             [--tpm2] (refused) [--pid file=F]
//! ```

use crate::device::Flags;
use crate::server::Config;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Parsed options.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: Config,
    pub pid_file: Option<PathBuf>,
}

pub const USAGE: &str = "usage: vtpm-server [socket] --tpmstate dir=DIR --server [type=tcp,]port=PORT[,bindaddr=ADDR] \
--ctrl type=tcp,port=PORT[,bindaddr=ADDR] [--flags not-need-init,startup-clear] [--pid file=FILE]";

/// Splits `key=value,key=value`.
fn key_values(arg: &str) -> Vec<(&str, &str)> {
    arg.split(',').filter(|s| !s.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, ""))).collect()
}

fn endpoint(opt: &str, arg: &str) -> Result<SocketAddr, String> {
    let mut port = None;
    let mut addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for (k, v) in key_values(arg) {
        match k {
            "type" if v == "tcp" => {}
            "type" => return Err(format!("{opt}: only type=tcp is supported, not type={v}")),
            "port" => port = Some(v.parse::<u16>().map_err(|_| format!("{opt}: bad port {v:?}"))?),
            "bindaddr" => addr = v.parse().map_err(|_| format!("{opt}: bad bindaddr {v:?}"))?,
            "disconnect" => {}
            _ => return Err(format!("{opt}: unknown parameter {k:?}")),
        }
    }
    let port = port.ok_or_else(|| format!("{opt}: port= is required"))?;
    Ok(SocketAddr::new(addr, port))
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("socket") {
        args.next();
    }
    let (mut dir, mut command, mut control, mut pid_file) = (None, None, None, None);
    let mut flags = Flags::default();
    while let Some(opt) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{opt} needs a value"));
        match opt.as_str() {
            "--tpmstate" => {
                for (k, v) in key_values(&value()?) {
                    match k {
                        "dir" => dir = Some(PathBuf::from(v)),
                        "mode" => {}
                        _ => return Err(format!("--tpmstate: unknown parameter {k:?}")),
                    }
                }
            }
            "--server" => command = Some(endpoint("--server", &value()?)?),
            "--ctrl" => control = Some(endpoint("--ctrl", &value()?)?),
            "--flags" => {
                for (k, _) in key_values(&value()?) {
                    match k {
                        "not-need-init" => flags.not_need_init = true,
                        "startup-clear" => flags.startup_clear = true,
                        _ => return Err(format!("--flags: unsupported flag {k:?}")),
                    }
                }
            }
            "--pid" => {
                for (k, v) in key_values(&value()?) {
                    match k {
                        "file" => pid_file = Some(PathBuf::from(v)),
                        _ => return Err(format!("--pid: unknown parameter {k:?}")),
                    }
                }
            }
            "--tpm2" => return Err("--tpm2: this server emulates a TPM 1.2 only".into()),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    if flags.startup_clear && !flags.not_need_init {
        return Err("--flags startup-clear needs not-need-init (the TPM must be powered to start it)".into());
    }
    Ok(Options {
        config: Config {
            state_dir: dir.ok_or("--tpmstate dir=DIR is required")?,
            command_addr: command.ok_or("--server port=PORT is required")?,
            control_addr: control.ok_or("--ctrl type=tcp,port=PORT is required")?,
            flags,
        },
        pid_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn swtpm_command_line_is_accepted() {
        let o = parse(args(
            "socket --tpmstate dir=/tmp/x --server type=tcp,port=2321 --ctrl type=tcp,port=2322 \
             --flags not-need-init,startup-clear",
        ))
        .unwrap();
        assert_eq!(o.config.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(o.config.command_addr, "127.0.0.1:2321".parse().unwrap());
        assert_eq!(o.config.control_addr, "127.0.0.1:2322".parse().unwrap());
        assert_eq!(o.config.flags, Flags { not_need_init: true, startup_clear: true });
    }

    #[test]
    fn bindaddr_and_defaults() {
        let o = parse(args("--tpmstate dir=d --server port=1,bindaddr=::1 --ctrl type=tcp,port=2")).unwrap();
        assert_eq!(o.config.command_addr, "[::1]:1".parse().unwrap());
        assert_eq!(o.config.flags, Flags::default());
    }

    #[test]
    fn errors_name_the_option() {
        let e = parse(args("--tpmstate dir=d --server type=unixio,path=x --ctrl type=tcp,port=2")).unwrap_err();
        assert!(e.contains("--server"), "{e}");
        let e = parse(args("--tpmstate dir=d --server port=1")).unwrap_err();
        assert!(e.contains("--ctrl"), "{e}");
        let e = parse(args("--tpm2")).unwrap_err();
        assert!(e.contains("1.2"), "{e}");
        let e =
            parse(args("--tpmstate dir=d --server port=1 --ctrl type=tcp,port=2 --flags startup-clear")).unwrap_err();
        assert!(e.contains("not-need-init"), "{e}");
    }
}
