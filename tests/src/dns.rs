//! A small DNS responder for the scenarios: a real UDP server on `IP:53` that answers A
//! queries from a fixed table (NXDOMAIN otherwise) with messages built by the same crate the
//! daemon parses them with. Stopped when dropped.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, UdpSocket},
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{Name, RData, Record, rdata::A},
};

pub struct DnsResponder {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl DnsResponder {
    /// Serves `table` (name → address) on `ip`:53.
    #[must_use]
    pub fn start(ip: Ipv4Addr, table: &[(&str, Ipv4Addr)]) -> Self {
        let sock = UdpSocket::bind((ip, 53)).unwrap_or_else(|e| panic!("binding {ip}:53: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let table: HashMap<String, Ipv4Addr> = table
            .iter()
            .map(|(n, a)| (n.trim_end_matches('.').to_ascii_lowercase(), *a))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::SeqCst) {
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.iter().cloned());
                let asked = q.queries.first().map(|q| {
                    let n = q.name().to_ascii().to_ascii_lowercase();
                    n.trim_end_matches('.').to_owned()
                });
                match asked.as_deref().and_then(|n| table.get(n)) {
                    Some(addr) => {
                        let owner =
                            Name::from_str(asked.as_deref().unwrap_or_default()).expect("name");
                        r.add_answer(Record::from_rdata(owner, 60, RData::A(A(*addr))));
                    }
                    None => r.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = r.to_vec() {
                    let _ = sock.send_to(&bytes, from);
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Queries answered so far.
    #[must_use]
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
