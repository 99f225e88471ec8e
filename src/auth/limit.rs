//! Failed logins, limited per client address: a token this node's copy of the keys does not
//! accept as a valid API key (a master key, a made-up key, one made through another node a
//! moment ago) takes one of its address's `auth.failed_logins_per_minute` guesses before it is
//! checked, given back unless it turns out to be no key (`AuthError::Unknown`); guesses refill
//! evenly over a minute, a minute's worth at most. An address with none left is answered 429
//! with `Retry-After` for every such token, without comparing it to the master keys or reading
//! the storage: guessing a master key an operator chose, or making the storage read one made-up
//! key id after another (cluster mode), goes no faster than the limit, requests sent at once
//! included, and a right guess looks like a wrong one while it lasts. A valid API key this node
//! knows is never limited, so clients behind the same address (a proxy's, a NAT's) keep working.
//!
//! IPv6 addresses count by their /64, which one client usually holds whole. The table keeps at
//! most [`MAX_PEERS`] addresses: past it, those whose guesses refilled are forgotten (they hold
//! nothing; looked for at most once a second), and while none has, new addresses share one count.
//! Each node counts its own.
//!
//! The client address is the one that connected, unless that is one of `auth.trusted_proxies`:
//! then it is the last address in `X-Forwarded-For` that is not a trusted proxy (each proxy adds
//! the address it was connected from at the end, so only the entries past the last untrusted one
//! were written by a proxy; a client writes whatever it likes before them). An entry that does
//! not read as an address (or a header value that is not text) stops the walk at the proxy that
//! wrote it, whose address counts. A trusted network trusts every address in it: list the
//! proxies' own addresses, not the networks their clients come from.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses counted at once (a few MiB of memory).
pub const MAX_PEERS: usize = 65_536;

/// Where failed logins come from: an IPv4 address, or an IPv6 address's /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer(u128);

impl Peer {
    pub fn of(ip: IpAddr) -> Peer {
        match ip {
            IpAddr::V4(v4) => Peer(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Peer(u128::from(u32::from(v4))),
                None => Peer(u128::from(v6) & !u128::from(u64::MAX)),
            },
        }
    }

    /// The count new addresses share while the table is full of addresses still limited.
    const OVERFLOW: Peer = Peer(u128::MAX);
}

/// The proxies whose `X-Forwarded-For` is believed (see the module's documentation).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// Reads `auth.trusted_proxies`: each an address or a network (`10.0.0.0/8`, `fd00::/8`);
    /// the entry that is neither otherwise.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|entry| {
                let text = entry.trim();
                text.parse::<ipnet::IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map(canonical)
                    .map_err(|_| entry.clone())
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.0.iter().any(|network| network.contains(&address))
    }

    /// Who sent a request that `connected` from, with these `X-Forwarded-For` values in the
    /// order they came.
    pub fn client<'a>(
        &self,
        connected: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> IpAddr {
        let mut client = connected.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let entries = forwarded_for.rev().flat_map(|value| value.rsplit(','));
        for entry in entries {
            match forwarded_address(entry.trim()) {
                Some(address) => {
                    client = address;
                    if !self.trusts(address) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// An IPv4 network written mapped into IPv6 (`::ffff:10.0.0.2`) as the IPv4 one it is, as
/// the addresses it is compared with are.
fn canonical(network: ipnet::IpNet) -> ipnet::IpNet {
    match network {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .unwrap_or(network),
            None => network,
        },
        network => network,
    }
}

/// An `X-Forwarded-For` entry's address: `192.0.2.1`, `2001:db8::1`, or either with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`) or in brackets.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let address = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
            inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
        })?;
    Some(address.to_canonical())
}

/// The failed logins of every address (see the module's documentation).
pub struct FailedLogins {
    /// Guesses an address has a minute; 0: not limited.
    per_minute: u32,
    peers: Mutex<Table>,
    /// Requests answered 429, for the metrics.
    limited: AtomicU64,
}

#[derive(Default)]
struct Table {
    peers: HashMap<Peer, Guesses>,
    /// When addresses whose guesses refilled were last looked for.
    swept: Option<Instant>,
}

/// How often a full table is looked through for addresses to forget.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The guesses an address has left, as of `at`.
#[derive(Clone, Copy)]
struct Guesses {
    left: f64,
    at: Instant,
}

impl FailedLogins {
    pub fn new(per_minute: u32) -> FailedLogins {
        FailedLogins {
            per_minute,
            peers: Mutex::new(Table::default()),
            limited: AtomicU64::new(0),
        }
    }

    /// Takes one of `peer`'s guesses at `now`, before its token is checked (so that requests
    /// checked at once cannot all pass on the same guess); how long it must wait for one when it
    /// has none left.
    pub fn take(&self, peer: Peer, now: Instant) -> Option<Duration> {
        if self.per_minute == 0 {
            return None;
        }
        let mut table = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let full = f64::from(self.per_minute);
        let Table { peers, swept } = &mut *table;
        if !peers.contains_key(&peer)
            && peers.len() >= MAX_PEERS
            && swept.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
        {
            // Those whose guesses refilled hold nothing worth keeping.
            peers.retain(|_, guesses| self.refilled(*guesses, now) < full);
            *swept = Some(now);
        }
        let peer = match peers.contains_key(&peer) || peers.len() < MAX_PEERS {
            true => peer,
            false => Peer::OVERFLOW,
        };
        let guesses = peers.entry(peer).or_insert(Guesses {
            left: full,
            at: now,
        });
        let left = self.refilled(*guesses, now);
        if left < 1.0 {
            return Some(Duration::from_secs_f64((1.0 - left) / self.per_second()));
        }
        *guesses = Guesses {
            left: left - 1.0,
            at: now,
        };
        None
    }

    /// Gives `peer` back the guess [`FailedLogins::take`] took, its token being a key after all
    /// (or not checked: its storage could not be read).
    pub fn give_back(&self, peer: Peer, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        let mut table = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let full = f64::from(self.per_minute);
        let peers = &mut table.peers;
        let peer = match peers.contains_key(&peer) {
            true => peer,
            false => Peer::OVERFLOW,
        };
        if let Some(guesses) = peers.get_mut(&peer) {
            *guesses = Guesses {
                left: (self.refilled(*guesses, now) + 1.0).min(full),
                at: now,
            };
        }
    }

    /// Counts a request answered 429.
    pub fn note_refused(&self) {
        self.limited.fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests were answered 429 since the start.
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }

    fn per_second(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }

    /// The guesses left at `now`: what was left, plus what a minute's even refill gave since, a
    /// minute's worth at most.
    fn refilled(&self, guesses: Guesses, now: Instant) -> f64 {
        let since = now.saturating_duration_since(guesses.at).as_secs_f64();
        (guesses.left + since * self.per_second()).min(f64::from(self.per_minute))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> Peer {
        Peer::of(text.parse().unwrap())
    }

    /// An address has a minute's worth of guesses, then waits for each as it refills; a guess
    /// given back (its token was a key) is there again; another address is not limited by it.
    #[test]
    fn an_address_waits_once_its_guesses_are_used_up() {
        let limit = FailedLogins::new(60);
        let (at, other) = (peer("192.0.2.1"), peer("192.0.2.2"));
        let now = Instant::now();
        for _ in 0..60 {
            assert_eq!(limit.take(at, now), None);
        }
        let wait = limit.take(at, now).expect("limited");
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert_eq!(limit.take(other, now), None);
        // One guess a second comes back.
        let later = now + Duration::from_secs(1);
        assert_eq!(limit.take(at, later), None);
        assert!(limit.take(at, later).is_some());
        limit.give_back(at, later);
        assert_eq!(limit.take(at, later), None);
        // No limit at all with 0.
        let off = FailedLogins::new(0);
        for _ in 0..1000 {
            assert_eq!(off.take(at, now), None);
        }
    }

    /// IPv6 addresses count by their /64; an IPv4 address mapped into IPv6 is that address.
    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(peer("2001:db8:1:2::1"), peer("2001:db8:1:2:ffff::9"));
        assert_ne!(peer("2001:db8:1:2::1"), peer("2001:db8:1:3::1"));
        assert_eq!(peer("::ffff:192.0.2.1"), peer("192.0.2.1"));
    }

    /// Behind a trusted proxy, the client is the last address its `X-Forwarded-For` lists that
    /// is no trusted proxy; whatever the client wrote before that is not believed, and an
    /// untrusted peer's header is not read at all.
    #[test]
    fn a_trusted_proxy_says_who_the_client_is() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "2001:db8::1".into()]).unwrap();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let client = |connected: &str, headers: &[&str]| {
            proxies.client(ip(connected), headers.iter().copied())
        };
        // Not a proxy: its header is the client's own word.
        assert_eq!(client("192.0.2.9", &["198.51.100.1"]), ip("192.0.2.9"));
        // A proxy: the address it saw, past any the client made up.
        assert_eq!(client("10.0.0.2", &["198.51.100.1"]), ip("198.51.100.1"));
        assert_eq!(
            client("10.0.0.2", &["1.1.1.1, 198.51.100.1"]),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("10.0.0.2", &["1.1.1.1", "198.51.100.1"]),
            ip("198.51.100.1")
        );
        // Two proxies in a row; one mapped into IPv6; entries with ports and brackets.
        assert_eq!(
            client("10.0.0.2", &["1.1.1.1, 198.51.100.1, 10.0.0.7"]),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("::ffff:10.0.0.2", &["198.51.100.1:4711"]),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("2001:db8::1", &["[2001:db8:5::1]:80"]),
            ip("2001:db8:5::1")
        );
        assert_eq!(
            client("2001:db8::1", &["[2001:db8:5::2]"]),
            ip("2001:db8:5::2")
        );
        // No header, or one that does not read: the proxy that sent it.
        assert_eq!(client("10.0.0.2", &[]), ip("10.0.0.2"));
        assert_eq!(client("10.0.0.2", &["1.1.1.1, unknown"]), ip("10.0.0.2"));
        assert_eq!(
            client("10.0.0.2", &["1.1.1.1, unknown, 10.0.0.7"]),
            ip("10.0.0.7")
        );
        assert_eq!(client("10.0.0.2", &["\0, , "]), ip("10.0.0.2"));
        // Only proxies: the first of them.
        assert_eq!(client("10.0.0.2", &["10.0.0.5, 10.0.0.6"]), ip("10.0.0.5"));
        // A proxy listed mapped into IPv6 is the IPv4 one.
        let mapped = TrustedProxies::parse(&["::ffff:10.0.0.2".into()]).unwrap();
        assert_eq!(
            mapped.client(ip("10.0.0.2"), ["198.51.100.1"].into_iter()),
            ip("198.51.100.1")
        );
        // Entries that are no address or network are named.
        assert_eq!(
            TrustedProxies::parse(&["10.0.0.0/8".into(), "proxy".into()]).unwrap_err(),
            "proxy"
        );
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&[]).unwrap().0.is_empty());
    }

    /// The table never holds more than [`MAX_PEERS`] addresses: those refilled are forgotten, and
    /// while every one is still limited, new addresses share one count.
    #[test]
    fn the_addresses_counted_are_bounded() {
        let limit = FailedLogins::new(1);
        let now = Instant::now();
        let address = |n: u32| Peer::of(IpAddr::V4(n.into()));
        for n in 0..MAX_PEERS as u32 {
            assert_eq!(limit.take(address(n), now), None);
        }
        // Full of limited addresses: a new one takes the overflow's guess, and the next waits.
        assert_eq!(limit.take(address(MAX_PEERS as u32), now), None);
        assert!(limit.take(address(MAX_PEERS as u32 + 1), now).is_some());
        assert!(limit.peers.lock().unwrap().peers.len() <= MAX_PEERS + 1);
        // A minute on, every address refilled: they are forgotten to make room.
        let later = now + Duration::from_secs(61);
        let new = address(MAX_PEERS as u32 + 2);
        assert_eq!(limit.take(new, later), None);
        assert_eq!(limit.peers.lock().unwrap().peers.len(), 1);
        assert!(limit.take(new, later).is_some());
    }
}
