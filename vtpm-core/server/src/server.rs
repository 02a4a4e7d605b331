//! The two TCP listeners of the swtpm socket interface.
//!
//! The command port takes one client at a time, as swtpm does: a raw TPM
//! command in, its response out, as many as the client sends, then the next
//! client. The control port takes one control client at a time, with any
//! number of requests on it. Both share the one `Device` behind a mutex,
//! held only while a command runs, never while waiting on the network.

use crate::ctrl::{self, Request};
use crate::device::{After, Device, Flags};
use crate::engine::Engine;
use crate::state::StateDir;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The largest TPM command accepted, as vtpm-core and libtpms bound it.
pub const MAX_COMMAND: usize = 4096;
/// How long the rest of a started message may take to arrive; swtpm gives
/// its control channel the same 500 ms.
const MESSAGE_DEADLINE: Duration = Duration::from_millis(500);
/// The largest control message accepted (a state blob with its header).
const MAX_CONTROL: usize = 1 << 20;

/// Where to listen and what to serve.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub command_addr: SocketAddr,
    pub control_addr: SocketAddr,
    pub flags: Flags,
}

struct Shared<E: Engine> {
    device: Mutex<Device<E>>,
    stopping: AtomicBool,
    /// The command client being served, so that shutdown can unblock it.
    command_client: Mutex<Option<TcpStream>>,
}

/// A bound, not yet running server.
pub struct Server<E: Engine> {
    shared: Arc<Shared<E>>,
    command: TcpListener,
    control: TcpListener,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while serving one client must not wedge the TPM for the next.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<E: Engine> Server<E> {
    /// Opens the state and binds both ports (port 0 picks free ones).
    pub fn bind(config: &Config) -> io::Result<Self> {
        let state = StateDir::open(&config.state_dir)?;
        let device = Device::open(state, config.flags)?;
        let command = TcpListener::bind(config.command_addr)?;
        let control = TcpListener::bind(config.control_addr)?;
        let shared = Arc::new(Shared {
            device: Mutex::new(device),
            stopping: AtomicBool::new(false),
            command_client: Mutex::new(None),
        });
        Ok(Server { shared, command, control })
    }

    pub fn command_addr(&self) -> SocketAddr {
        self.command.local_addr().expect("bound listener has an address")
    }

    pub fn control_addr(&self) -> SocketAddr {
        self.control.local_addr().expect("bound listener has an address")
    }

    /// Serves until a control client sends CMD_SHUTDOWN.
    pub fn run(self) -> io::Result<()> {
        let command_addr = self.command_addr();
        let shared = Arc::clone(&self.shared);
        let command_thread =
            thread::Builder::new().name("vtpm-command".into()).spawn(move || serve_commands(&shared, &self.command))?;

        for stream in self.control.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("vtpm-server: control accept: {e}");
                    continue;
                }
            };
            if serve_control(&self.shared, stream) == After::Terminate {
                break;
            }
        }

        // Wake the command thread: end its client, then its accept().
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(client) = lock(&self.shared.command_client).take() {
            let _ = client.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(command_addr);
        command_thread.join().map_err(|_| io::Error::other("command thread panicked"))
    }

    /// Runs the server on its own thread (for tests and embedding).
    pub fn spawn(self) -> io::Result<JoinHandle<io::Result<()>>> {
        thread::Builder::new().name("vtpm-server".into()).spawn(move || self.run())
    }
}

fn serve_commands<E: Engine>(shared: &Shared<E>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("vtpm-server: command accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Ok(clone) = stream.try_clone() {
            *lock(&shared.command_client) = Some(clone);
        }
        loop {
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            let command = match read_command(&mut stream) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    if e.kind() != ErrorKind::ConnectionReset {
                        eprintln!("vtpm-server: command read: {e}");
                    }
                    break;
                }
            };
            let response = lock(&shared.device).process(&command);
            if stream.write_all(&response).is_err() {
                break;
            }
        }
        *lock(&shared.command_client) = None;
    }
}

/// Reads one TPM command: at least its 10-byte header, then the rest its
/// paramSize announces. A paramSize that is out of range, or a rest that
/// does not come within the deadline, hands the engine what did arrive, so
/// it answers the malformed command as a TPM would (swtpm passes on whatever
/// its read returned). `Ok(None)` is a clean end of connection.
pub fn read_command(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_COMMAND];
    let mut have = 0;
    stream.set_read_timeout(None)?;
    while have < 10 {
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return if have == 0 { Ok(None) } else { Err(ErrorKind::UnexpectedEof.into()) };
        }
        have += n;
    }
    let declared = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    if (10..=MAX_COMMAND).contains(&declared) && have < declared {
        let deadline = Instant::now() + MESSAGE_DEADLINE;
        while have < declared {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf[have..]) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => return Err(e),
            }
        }
        stream.set_read_timeout(None)?;
    }
    buf.truncate(have);
    Ok(Some(buf))
}

fn serve_control<E: Engine>(shared: &Shared<E>, mut stream: TcpStream) -> After {
    loop {
        let (code, body) = match read_control(&mut stream) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return After::Continue,
        };
        let (answer, after) = match Request::parse(code, &body) {
            Ok(request) => lock(&shared.device).control(request),
            Err(ctrl::BadInput) => (ctrl::result_only(ctrl::rc::BAD_PARAMETER), After::Continue),
        };
        if stream.write_all(&answer).is_err() {
            return after;
        }
        if after == After::Terminate {
            return after;
        }
    }
}

/// Reads one control message: the code and the body its request layout
/// calls for, within the deadline once the first byte is in; a message that
/// stays incomplete closes the connection, as in swtpm.
fn read_control(stream: &mut TcpStream) -> io::Result<Option<(u32, Vec<u8>)>> {
    let mut buf = vec![0u8; 4096];
    stream.set_read_timeout(None)?;
    let mut have = stream.read(&mut buf)?;
    if have == 0 {
        return Ok(None);
    }
    let deadline = Instant::now() + MESSAGE_DEADLINE;
    loop {
        if have >= 4 {
            let code = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let body = &buf[4..have];
            let needed = match ctrl::fixed_request_len(code) {
                Some(n) => Some(n),
                None => ctrl::variable_request_header(code).and_then(|(hdr, at)| {
                    (body.len() >= hdr).then(|| {
                        hdr + u32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]) as usize
                    })
                }),
            };
            if let Some(n) = needed {
                if 4 + n > MAX_CONTROL {
                    return Err(io::Error::new(ErrorKind::InvalidData, "control message too large"));
                }
                if body.len() >= n {
                    return Ok(Some((code, body.to_vec())));
                }
                if buf.len() < 4 + n {
                    buf.resize(4 + n, 0);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
}
