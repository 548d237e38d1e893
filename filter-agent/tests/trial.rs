//! `filter-agent try` and `confirm` against a real agent on veth, checked
//! with real traffic: rules on trial are in force when `try` returns, go
//! back at the deadline unless confirmed, survive a restart once
//! confirmed, and never outlive an agent killed during the trial. Bad
//! requests change nothing and say why in one line. Needs root.

use std::{
    net::UdpSocket,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use testbed::{Daemon, Pair, within};

mod support;
use support::{AGENT, Pins};

const PORT: u16 = 9001;
/// What runs before the trial: everything passes.
const PREVIOUS: &str = "[filter]\ndefault = \"allow\"\n";
/// What is tried: the probe's port denied.
const NEW: &str = "[filter]\ndefault = \"allow\"\n\n[[rule]]\nname = \"deny-9001\"\naction = \"deny\"\nproto = \"udp\"\ndport = 9001\n";
const WAIT: Duration = Duration::from_secs(20);

/// An agent on `pair`'s server end with its rules file and a control
/// socket of its own (tests run side by side).
struct Setup {
    pair: Pair,
    dir: tempfile::TempDir,
    receiver: UdpSocket,
    _pins: Pins,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let pair = Pair::create(tag).unwrap();
        let pins = Pins::of(&pair.server_if);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.toml"), PREVIOUS).unwrap();
        std::fs::write(dir.path().join("new.toml"), NEW).unwrap();
        let receiver = pair
            .server
            .run(|| UdpSocket::bind(("0.0.0.0", PORT)))
            .unwrap()
            .unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        Self {
            pair,
            dir,
            receiver,
            _pins: pins,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("control.sock")
    }

    fn start(&self) -> Daemon {
        let (rules, socket) = (self.path("rules.toml"), self.socket());
        let args = [
            "--iface",
            &self.pair.server_if,
            "--rules",
            rules.to_str().unwrap(),
            "--control-socket",
            socket.to_str().unwrap(),
        ];
        Daemon::agent(AGENT, &self.pair.server, args)
    }

    /// `filter-agent ARGS --control-socket SOCKET`.
    fn client(&self, args: &[&str]) -> Output {
        Command::new(AGENT)
            .args(args)
            .arg("--control-socket")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    fn try_rules(&self, file: &str, timeout: u64) -> Output {
        let path = self.path(file);
        let timeout = timeout.to_string();
        let args = [
            "try",
            "--rules",
            path.to_str().unwrap(),
            "--timeout",
            &timeout,
        ];
        self.client(&args)
    }

    /// One datagram to the probe's port: whether it arrived.
    fn passes(&self) -> bool {
        let sender = self
            .pair
            .client
            .run(|| UdpSocket::bind((Pair::CLIENT_V4, 0)))
            .unwrap()
            .unwrap();
        sender.send_to(b"probe", (Pair::SERVER_V4, PORT)).unwrap();
        let mut buf = [0u8; 16];
        self.receiver.recv(&mut buf).is_ok()
    }

    fn metrics(&self) -> String {
        let (_, body) =
            testbed::traffic::http_get(&self.pair.server, "127.0.0.1:9469", "/metrics").unwrap();
        body
    }
}

fn succeeded(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The one line of a command that failed with exit code 1.
fn refusal(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr.trim().to_owned()
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

#[test]
fn rules_on_trial_go_back_at_the_deadline_unless_confirmed() {
    let setup = Setup::new("trv");
    let mut agent = setup.start();
    assert!(setup.passes(), "the previous rules let the probe through");
    let said = succeeded(&setup.try_rules("new.toml", 4));
    assert!(
        said.contains(&format!("in force on {} until", setup.pair.server_if)),
        "{said}"
    );
    assert!(
        !setup.passes(),
        "`try` returned before the new rules were in force"
    );
    let page = setup.metrics();
    assert_eq!(metric(&page, "filter_agent_trial_active"), 1.0);
    assert!(
        metric(&page, "filter_agent_trial_deadline_seconds") > 1.7e9,
        "{page}"
    );

    let again = refusal(&setup.try_rules("new.toml", 4));
    assert!(again.contains("already on trial until"), "{again}");

    agent.expect("trial not confirmed before its deadline", WAIT);
    assert!(
        within(WAIT, || setup.passes()),
        "the previous rules never came back"
    );
    let page = setup.metrics();
    assert_eq!(metric(&page, "filter_agent_trial_active"), 0.0);
    assert_eq!(metric(&page, "filter_agent_trial_reverts_total"), 1.0);
    let file = std::fs::read_to_string(setup.path("rules.toml")).unwrap();
    assert_eq!(file, PREVIOUS, "the rules file changed during the trial");
    let nothing = refusal(&setup.client(&["confirm"]));
    assert!(nothing.contains("nothing to confirm"), "{nothing}");
}

#[test]
fn confirmed_rules_are_written_and_kept_across_a_restart() {
    let setup = Setup::new("trc");
    let mut agent = setup.start();
    succeeded(&setup.try_rules("new.toml", 120));
    assert!(!setup.passes());
    let said = succeeded(&setup.client(&["confirm"]));
    assert!(
        said.contains("holds the rules that were on trial"),
        "{said}"
    );
    let file = std::fs::read_to_string(setup.path("rules.toml")).unwrap();
    assert_eq!(file, NEW, "confirm did not write the rules file");
    // The agent sees its file change to the rules it runs.
    agent.expect("rules reloaded", WAIT);
    assert_eq!(metric(&setup.metrics(), "filter_agent_trial_active"), 0.0);
    drop(agent);
    let _agent = setup.start();
    assert!(
        !setup.passes(),
        "the confirmed rules did not survive a restart"
    );
}

#[test]
fn an_agent_killed_during_a_trial_comes_back_with_the_previous_rules() {
    let setup = Setup::new("trk");
    let agent = setup.start();
    succeeded(&setup.try_rules("new.toml", 120));
    assert!(!setup.passes());
    agent.signal(libc::SIGKILL);
    let (_, _) = agent.stop();
    let _agent = setup.start();
    assert!(
        setup.passes(),
        "after a restart the rules on trial are still in force"
    );
}

#[test]
fn bad_requests_change_nothing_and_say_why() {
    let setup = Setup::new("trb");
    std::fs::write(
        setup.path("bad.toml"),
        "[filter]\ndefault = \"sometimes\"\n",
    )
    .unwrap();
    let no_agent = refusal(&setup.try_rules("new.toml", 10));
    assert!(no_agent.contains("no running agent"), "{no_agent}");
    let _agent = setup.start();
    let bad = refusal(&setup.try_rules("bad.toml", 10));
    assert!(bad.contains("bad.toml:2:11"), "{bad}");
    assert!(setup.passes(), "a refused file changed the rules");
    let nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            AGENT,
            "confirm",
        ])
        .arg("--control-socket")
        .arg(setup.socket())
        .output()
        .unwrap();
    let nobody = refusal(&nobody);
    assert!(nobody.contains("run as root"), "{nobody}");
    assert_eq!(
        std::fs::read_to_string(setup.path("rules.toml")).unwrap(),
        PREVIOUS
    );
}

/// Default deny, nothing allowed: it cuts any session.
const CUTS_EVERYTHING: &str = "[filter]\ndefault = \"deny\"\n";

#[test]
fn rules_that_cut_an_established_session_are_refused_or_warned_about() {
    let setup = Setup::new("trs");
    std::fs::write(setup.path("deny.toml"), CUTS_EVERYTHING).unwrap();
    let mut agent = setup.start();
    // A session from the client to a service of the server's namespace.
    let server = (Pair::SERVER_V4, 2222);
    let listener = setup
        .pair
        .server
        .run(|| std::net::TcpListener::bind(server))
        .unwrap()
        .unwrap();
    let client = setup
        .pair
        .client
        .run(|| std::net::TcpStream::connect(server))
        .unwrap()
        .unwrap();
    let (_accepted, _) = listener.accept().unwrap();
    let peer = client.local_addr().unwrap();
    let expected = format!("would cut the established session {peer} -> :2222 (default deny)");

    let refused = setup.try_rules("deny.toml", 60);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.lines().any(|line| line == expected), "{stderr}");
    assert!(stderr.contains("--force applies them anyway"), "{stderr}");
    assert!(setup.passes(), "a refused trial changed the rules");

    // `check --live` in the agent's namespace says the same, and fails.
    let live = setup
        .pair
        .server
        .command(AGENT)
        .args(["check", "--live", "--rules"])
        .arg(setup.path("deny.toml"))
        .output()
        .unwrap();
    assert_eq!(live.status.code(), Some(1), "{live:?}");
    assert!(
        String::from_utf8_lossy(&live.stdout).contains(&expected),
        "{live:?}"
    );

    let forced = setup.client(&[
        "try",
        "--force",
        "--rules",
        setup.path("deny.toml").to_str().unwrap(),
    ]);
    succeeded(&forced);
    assert!(!setup.passes(), "--force did not apply the rules");

    // A plain reload that cuts it is applied, and warned about and counted.
    std::fs::write(setup.path("rules.toml"), CUTS_EVERYTHING).unwrap();
    let warned = agent.expect("the reloaded rules would cut", WAIT);
    assert!(warned.contains(&expected), "{warned}");
    let page = setup.metrics();
    assert_eq!(metric(&page, "filter_agent_reload_cut_sessions_total"), 1.0);
    assert_eq!(
        metric(&page, "filter_agent_trial_active"),
        0.0,
        "the reload ended the trial"
    );
}
