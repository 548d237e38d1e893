//! Ethernet frames from pcap and pcapng files, for `filter-agent replay`.

use std::{
    fs::File,
    io::{BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

use pcap_file::{
    DataLink,
    pcap::PcapReader,
    pcapng::{Block, PcapNgReader},
};
use thiserror::Error;

const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

#[derive(Debug, Error)]
pub enum PcapError {
    #[error("cannot read capture {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid pcap or pcapng file", path.display())]
    Format {
        path: PathBuf,
        source: pcap_file::PcapError,
    },
    #[error("{}: packet {packet} has link type {link:?}; only Ethernet captures can be replayed", path.display())]
    LinkType {
        path: PathBuf,
        packet: u64,
        link: DataLink,
    },
}

/// Calls `each` with every frame of the capture at `path`, in order, and
/// when it was captured (since the epoch; a block without a time stamp
/// takes the one before it). Returns the number of frames.
pub fn for_each_frame<E: From<PcapError>>(
    path: &Path,
    each: impl FnMut(Duration, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let open = |source| PcapError::Open {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(open)?;
    file.seek(SeekFrom::Start(0)).map_err(open)?;
    let file = BufReader::new(file);
    if magic == PCAPNG_MAGIC {
        pcapng_frames(path, file, each)
    } else {
        pcap_frames(path, file, each)
    }
}

/// A file's format error.
fn format(path: &Path) -> impl Fn(pcap_file::PcapError) -> PcapError + '_ {
    move |source| PcapError::Format {
        path: path.to_owned(),
        source,
    }
}

/// Packet number `packet` is not Ethernet but `link`.
fn link_type(path: &Path, packet: u64, link: DataLink) -> PcapError {
    PcapError::LinkType {
        path: path.to_owned(),
        packet,
        link,
    }
}

fn pcapng_frames<E: From<PcapError>>(
    path: &Path,
    file: BufReader<File>,
    mut each: impl FnMut(Duration, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let (mut count, mut time) = (0, Duration::ZERO);
    let mut reader = PcapNgReader::new(file).map_err(format(path))?;
    // Link type per interface of the current section.
    let mut links: Vec<DataLink> = Vec::new();
    while let Some(block) = reader.next_block() {
        let (interface, data) = match block.map_err(format(path))? {
            Block::SectionHeader(_) => {
                links.clear();
                continue;
            }
            Block::InterfaceDescription(description) => {
                links.push(description.linktype);
                continue;
            }
            Block::EnhancedPacket(packet) => {
                time = packet.timestamp;
                (packet.interface_id, packet.data)
            }
            Block::Packet(packet) => {
                // The obsolete block's default resolution: microseconds.
                time = Duration::from_micros(packet.timestamp);
                (u32::from(packet.interface_id), packet.data)
            }
            Block::SimplePacket(packet) => (0, packet.data),
            _ => continue,
        };
        count += 1;
        let link = links
            .get(interface as usize)
            .copied()
            .unwrap_or(DataLink::ETHERNET);
        if link != DataLink::ETHERNET {
            return Err(link_type(path, count, link).into());
        }
        each(time, &data)?;
    }
    Ok(count)
}

fn pcap_frames<E: From<PcapError>>(
    path: &Path,
    file: BufReader<File>,
    mut each: impl FnMut(Duration, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let mut count = 0;
    let mut reader = PcapReader::new(file).map_err(format(path))?;
    let link = reader.header().datalink;
    while let Some(packet) = reader.next_packet() {
        let packet = packet.map_err(format(path))?;
        count += 1;
        if link != DataLink::ETHERNET {
            return Err(link_type(path, count, link).into());
        }
        each(packet.timestamp, &packet.data)?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use pcap_file::{
        pcap::{PcapHeader, PcapPacket, PcapWriter},
        pcapng::{
            PcapNgWriter,
            blocks::{
                enhanced_packet::EnhancedPacketBlock,
                interface_description::InterfaceDescriptionBlock,
            },
        },
    };

    use super::*;

    fn write_pcap(path: &Path, datalink: DataLink, frames: &[&[u8]]) {
        let header = PcapHeader {
            datalink,
            ..Default::default()
        };
        let mut writer = PcapWriter::with_header(File::create(path).unwrap(), header).unwrap();
        for (second, frame) in (1..).zip(frames) {
            let time = Duration::from_secs(second);
            writer
                .write_packet(&PcapPacket::new(time, frame.len() as u32, frame))
                .unwrap();
        }
    }

    #[test]
    fn reads_frames_in_order_and_rejects_other_link_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pcap");
        write_pcap(&path, DataLink::ETHERNET, &[b"first frame...", b"second"]);
        let mut seen = Vec::new();
        let count = for_each_frame::<PcapError>(&path, |time, frame| {
            seen.push((time.as_secs(), frame.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 2);
        assert_eq!(
            seen,
            [(1, b"first frame...".to_vec()), (2, b"second".to_vec())]
        );

        write_pcap(&path, DataLink::RAW, &[b"raw ip"]);
        let err = for_each_frame::<PcapError>(&path, |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("only Ethernet"), "{err}");

        // pcapng, with the link type given per interface.
        let path = dir.path().join("a.pcapng");
        let mut writer = PcapNgWriter::new(File::create(&path).unwrap()).unwrap();
        writer
            .write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::ETHERNET, 0))
            .unwrap();
        writer
            .write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::RAW, 0))
            .unwrap();
        let packet = |interface_id, data: &'static [u8]| EnhancedPacketBlock {
            interface_id,
            timestamp: Duration::ZERO,
            original_len: data.len() as u32,
            data: data.into(),
            options: Vec::new(),
        };
        writer
            .write_pcapng_block(packet(0, b"ethernet frame"))
            .unwrap();
        drop(writer);
        let count = for_each_frame::<PcapError>(&path, |_, frame| {
            assert_eq!(frame, b"ethernet frame");
            Ok(())
        })
        .unwrap();
        assert_eq!(count, 1);
        let mut writer = PcapNgWriter::new(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap(),
        )
        .unwrap();
        writer
            .write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::RAW, 0))
            .unwrap();
        writer.write_pcapng_block(packet(0, b"raw ip")).unwrap();
        drop(writer);
        let err = for_each_frame::<PcapError>(&path, |_, _| Ok(())).unwrap_err();
        assert!(
            err.to_string().contains("packet 2 has link type RAW"),
            "{err}"
        );

        std::fs::write(&path, b"not a capture at all").unwrap();
        let err = for_each_frame::<PcapError>(&path, |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("not a valid pcap"), "{err}");
    }
}
