//! Just enough DER to read the validity, subject and SPKI of a certificate. A full X.509
//! parser (x509-parser: nom, asn1-rs, der-parser, oid-registry) would be the biggest
//! dependency of the agent for three fields.

use std::time::SystemTime;

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const CONTEXT_0: u8 = 0xa0;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_O: &[u8] = &[0x55, 0x04, 0x0a];
const OID_OU: &[u8] = &[0x55, 0x04, 0x0b];

struct Reader<'a> {
    data: &'a [u8],
}

/// One TLV: tag, content, and the whole encoding.
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    raw: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.data.first().copied()
    }

    fn next(&mut self) -> Result<Tlv<'a>, String> {
        let d = self.data;
        let tag = *d.first().ok_or("truncated: missing tag")?;
        let first = *d.get(1).ok_or("truncated: missing length")?;
        let (len, hdr) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return Err(format!("unsupported length encoding 0x{first:02x}"));
            }
            let bytes = d.get(2..2 + n).ok_or("truncated length")?;
            let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, 2 + n)
        };
        let end = hdr.checked_add(len).ok_or("length overflow")?;
        let raw = d.get(..end).ok_or("truncated content")?;
        self.data = &d[end..];
        Ok(Tlv {
            tag,
            content: &raw[hdr..],
            raw,
        })
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
        let t = self.next()?;
        if t.tag != tag {
            return Err(format!(
                "{what}: expected tag 0x{tag:02x}, got 0x{:02x}",
                t.tag
            ));
        }
        Ok(t)
    }
}

pub(super) fn parse_certificate(der: &[u8]) -> Result<super::identity::CertificateInfo, String> {
    let cert = Reader::new(der).expect(SEQUENCE, "Certificate")?;
    let tbs = Reader::new(cert.content).expect(SEQUENCE, "TBSCertificate")?;
    let mut r = Reader::new(tbs.content);
    // `[0] EXPLICIT Version DEFAULT v1`: absent means v1; the INTEGER is the version - 1.
    let mut version = 1;
    if r.peek_tag() == Some(CONTEXT_0) {
        let v = r.next()?;
        let int = Reader::new(v.content).expect(INTEGER, "version")?;
        version = match int.content {
            [n @ 0..=2] => n + 1,
            _ => return Err("unknown certificate version".into()),
        };
    }
    r.next()?; // serialNumber
    r.expect(SEQUENCE, "signature")?;
    r.expect(SEQUENCE, "issuer")?;
    let validity = r.expect(SEQUENCE, "validity")?;
    let subject = r.expect(SEQUENCE, "subject")?;
    let spki = r.expect(SEQUENCE, "subjectPublicKeyInfo")?;

    let mut v = Reader::new(validity.content);
    let not_before = parse_time(&v.next()?)?;
    let not_after = parse_time(&v.next()?)?;

    let mut info = super::identity::CertificateInfo {
        common_name: None,
        organization: Vec::new(),
        organizational_units: Vec::new(),
        not_before,
        not_after,
        public_key_der: spki.raw.to_vec(),
        version,
    };
    let mut rdns = Reader::new(subject.content);
    while !rdns.is_empty() {
        let set = rdns.expect(SET, "RelativeDistinguishedName")?;
        let mut atvs = Reader::new(set.content);
        while !atvs.is_empty() {
            let atv = atvs.expect(SEQUENCE, "AttributeTypeAndValue")?;
            let mut a = Reader::new(atv.content);
            let oid = a.expect(OID, "attribute type")?;
            let value = a.next()?;
            // Directory strings: UTF8/Printable/IA5/T61 are all ASCII-compatible here.
            let text = String::from_utf8_lossy(value.content).into_owned();
            match oid.content {
                OID_CN => info.common_name = Some(text),
                OID_O => info.organization.push(text),
                OID_OU => info.organizational_units.push(text),
                _ => {}
            }
        }
    }
    Ok(info)
}

fn parse_time(t: &Tlv<'_>) -> Result<SystemTime, String> {
    let s = std::str::from_utf8(t.content).map_err(|_| "time is not ASCII")?;
    let digits = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r)
            .filter(|x| x.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| format!("bad time `{s}`"))
    };
    let (year, rest) = match t.tag {
        // RFC 5280 §4.1.2.5.1: YY >= 50 is 19YY.
        UTC_TIME => {
            let yy = digits(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        GENERALIZED_TIME => (digits(0..4)?, 4),
        other => return Err(format!("unexpected time tag 0x{other:02x}")),
    };
    if !s.ends_with('Z') || s.len() != rest + 11 {
        return Err(format!("unsupported time format `{s}`"));
    }
    let month = digits(rest..rest + 2)?;
    let day = digits(rest + 2..rest + 4)?;
    let hour = digits(rest + 4..rest + 6)?;
    let min = digits(rest + 6..rest + 8)?;
    let sec = digits(rest + 8..rest + 10)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err(format!("time out of range `{s}`"));
    }
    crate::clock::utc(
        year,
        month as u32,
        day as u32,
        hour as u8,
        min as u8,
        sec as u8,
    )
    .ok_or_else(|| format!("no such date `{s}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times() {
        let t = |tag, s: &str| {
            parse_time(&Tlv {
                tag,
                content: s.as_bytes(),
                raw: &[],
            })
        };
        assert_eq!(t(UTC_TIME, "700101000000Z").unwrap(), UNIX_EPOCH);
        assert_eq!(
            t(GENERALIZED_TIME, "20000301000000Z").unwrap(),
            UNIX_EPOCH + Duration::from_secs(11_017 * 86_400)
        );
        assert_eq!(
            t(UTC_TIME, "491231235959Z").unwrap(),
            UNIX_EPOCH + Duration::from_secs(2_524_607_999)
        );
        assert!(t(UTC_TIME, "7001010000Z").is_err());
        assert!(t(UTC_TIME, "701301000000Z").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x05, 0x02],
        ] {
            assert!(parse_certificate(bad).is_err());
        }
    }
}
