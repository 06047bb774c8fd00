// A devrep client in C++: proof that the service is usable from any language with gRPC and a Unix socket.
// It follows docs/protocol.md step by step, reading no Python:
//   1. side channel: connect (SOCK_SEQPACKET), `hello` -> session token;
//   2. a memfd (MFD_ALLOW_SEALING, sealed F_SEAL_SHRINK|F_SEAL_GROW), mapped MAP_SHARED read-write;
//   3. sync tracking: a userfaultfd (UFFDIO_API with the WP features), the mapping registered with
//      UFFDIO_REGISTER_MODE_WP and write-protected (UFFDIO_WRITEPROTECT), `put_fds` kind "memfd+uffd" -> ticket;
//   4. gRPC RegisterRegion(memfd{ticket, nbytes, writer_base}, TRACKING_MODE_SYNC), Replicate to cpu:0;
//   5. a store to the region (the server's fault handler invalidates the page, no Invalidate call);
//   6. gRPC Acquire(fresh) -> lease; side channel `lease_fd` -> the replica memfd, mapped PROT_READ; compare;
//   7. ShareRegion("*"), print a line for the test, wait for stdin to close, then `bye`.
//
// Build (see README.md): protoc + grpc_cpp_plugin on protos/devrep/v1/devrep.proto, then
//   g++ -std=c++17 client.cc devrep.pb.cc devrep.grpc.pb.cc $(pkg-config --cflags --libs grpc++ protobuf)
// Usage: client GRPC_SOCKET FD_SOCKET REGION_NAME [sync|async]
//   async: the same with UFFD_FEATURE_WP_ASYNC, /proc/self/pagemap as a third fd, kind "memfd+uffd+pagemap".
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "devrep/v1/devrep.grpc.pb.h"

// Newer than some distributions' kernel headers (values from include/uapi/linux/userfaultfd.h).
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMaxMessage = 64 * 1024;  // side-channel packet limit
constexpr int kMaxFds = 4;

[[noreturn]] void die(const std::string& what) {
  std::cerr << "cpp_client: " << what << std::endl;
  std::exit(1);
}

void check_sys(long rc, const char* what) {
  if (rc < 0) die(std::string(what) + ": " + std::strerror(errno));
}

// ------------------------------------------------------------------------------------------ side channel
// One packet = one UTF-8 JSON object (<= 64 KiB) plus up to 4 fds as SCM_RIGHTS ancillary data.
class SideChannel {
 public:
  explicit SideChannel(const std::string& path) {
    fd_ = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    check_sys(fd_, "socket(AF_UNIX, SOCK_SEQPACKET)");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof(addr.sun_path)) die("fd socket path too long");
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    check_sys(connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), "connect(fd socket)");
    timeval tv{30, 0};  // every reply within 30 s, or we give up (never hang)
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  ~SideChannel() { close(fd_); }

  // Send `request` (JSON) with `fds`; return the reply object (throws on {"ok": false}) and its fds.
  google::protobuf::Struct call(const std::string& request, const std::vector<int>& fds,
                                std::vector<int>* got_fds = nullptr) {
    iovec iov{const_cast<char*>(request.data()), request.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> control(CMSG_SPACE(sizeof(int) * kMaxFds), 0);
    if (!fds.empty()) {
      msg.msg_control = control.data();
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
      cmsg->cmsg_level = SOL_SOCKET;
      cmsg->cmsg_type = SCM_RIGHTS;
      cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
    }
    check_sys(sendmsg(fd_, &msg, MSG_NOSIGNAL), "sendmsg(side channel)");

    std::vector<char> buf(kMaxMessage + 1);
    iovec riov{buf.data(), buf.size()};
    msghdr reply{};
    reply.msg_iov = &riov;
    reply.msg_iovlen = 1;
    std::fill(control.begin(), control.end(), 0);
    reply.msg_control = control.data();
    reply.msg_controllen = control.size();
    ssize_t n = recvmsg(fd_, &reply, MSG_CMSG_CLOEXEC);
    check_sys(n, "recvmsg(side channel)");
    if (n == 0) die("the server closed the side channel");
    if (reply.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) die("truncated side-channel reply");
    for (cmsghdr* c = CMSG_FIRSTHDR(&reply); c; c = CMSG_NXTHDR(&reply, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        std::vector<int> in(count);
        std::memcpy(in.data(), CMSG_DATA(c), count * sizeof(int));
        for (int f : in) {
          if (got_fds) got_fds->push_back(f); else close(f);
        }
      }
    }
    google::protobuf::Struct obj;
    auto status = google::protobuf::util::JsonStringToMessage(std::string(buf.data(), n), &obj);
    if (!status.ok()) die("side-channel reply is not JSON: " + status.ToString());
    const auto& f = obj.fields();
    if (!f.count("ok") || !f.at("ok").bool_value()) {
      std::string code = f.count("code") ? f.at("code").string_value() : "?";
      std::string error = f.count("error") ? f.at("error").string_value() : "?";
      die("side channel " + request + " -> " + code + ": " + error);
    }
    return obj;
  }

 private:
  int fd_ = -1;
};

// ------------------------------------------------------------------------------------------ userfaultfd
// Sync tracking, client half: a userfaultfd whose API handshake asks for the write-protect features of
// shmem/memfd pages, with the writer's mapping registered in WP mode and entirely write-protected. The server
// reads its fault messages; until it does, a store to the range blocks.
// Async tracking differs only in the features: WP_ASYNC makes the kernel resolve write faults itself (clearing
// the page's write-protect bit, which the server finds with PAGEMAP_SCAN on our pagemap), so writes never block.
int prepare_uffd(void* base, size_t length, bool async_mode) {
  long fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);  // the root-or-group gated alternative
    if (dev >= 0) {
      fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
      close(dev);
    }
  }
  check_sys(fd, "userfaultfd");
  // The API handshake is once per fd: probe what this kernel supports on a throwaway fd first.
  uffdio_api probe{UFFD_API, 0, 0};
  {
    long p = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (p >= 0) {
      check_sys(ioctl(p, UFFDIO_API, &probe), "UFFDIO_API (probe)");
      close(p);
    }
  }
  uint64_t wanted = UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED;
  uint64_t required = async_mode ? UFFD_FEATURE_WP_ASYNC : 0;
  if (required & ~probe.features) die("this kernel lacks UFFD_FEATURE_WP_ASYNC (Linux >= 6.7): use sync mode");
  uffdio_api api{UFFD_API, (probe.features ? (wanted & probe.features) : UFFD_FEATURE_WP_HUGETLBFS_SHMEM) | required,
                 0};
  check_sys(ioctl(fd, UFFDIO_API, &api), "UFFDIO_API");
  if (!(api.features & UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
    die("this kernel cannot write-protect shmem pages (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, Linux >= 5.19)");
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(base);
  reg.range.len = length;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  check_sys(ioctl(fd, UFFDIO_REGISTER, &reg), "UFFDIO_REGISTER(MODE_WP)");
  uffdio_writeprotect wp{};
  wp.range.start = reinterpret_cast<uint64_t>(base);
  wp.range.len = length;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  check_sys(ioctl(fd, UFFDIO_WRITEPROTECT, &wp), "UFFDIO_WRITEPROTECT");
  return static_cast<int>(fd);
}

uint64_t fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

void check_grpc(const grpc::Status& s, const char* what) {
  if (!s.ok()) die(std::string(what) + ": " + std::to_string(s.error_code()) + " " + s.error_message());
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 5 ? argv[4] : "sync";
  if ((argc != 4 && argc != 5) || (mode != "sync" && mode != "async")) {
    std::cerr << "usage: " << argv[0] << " GRPC_SOCKET FD_SOCKET REGION_NAME [sync|async]" << std::endl;
    return 2;
  }
  const bool async_mode = mode == "async";
  const std::string grpc_socket = argv[1], fd_socket = argv[2], name = argv[3];
  const size_t npages = 64, nbytes = npages * kPage;
  const size_t written_page = 3;

  // 1. Session.
  SideChannel side(fd_socket);
  auto hello = side.call(R"({"op":"hello","label":"cpp-client"})", {});
  const std::string token = hello.fields().at("token").string_value();

  // 2. The region's memory: a sealed memfd mapped shared, read-write.
  int memfd = memfd_create("devrep:cpp", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  check_sys(memfd, "memfd_create");
  check_sys(ftruncate(memfd, nbytes), "ftruncate");
  check_sys(fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), "F_ADD_SEALS");
  auto* host = static_cast<uint8_t*>(mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0));
  if (host == MAP_FAILED) die(std::string("mmap: ") + std::strerror(errno));
  for (size_t i = 0; i < nbytes; ++i) host[i] = static_cast<uint8_t>(i * 7 + 1);  // before tracking: no faults

  // 3. Sync tracking: userfaultfd on our mapping; hand memfd + uffd over (in that order), then drop our uffd.
  //    Async: memfd, uffd, and our /proc/self/pagemap (opened read-only), in that order.
  int uffd = prepare_uffd(host, nbytes, async_mode);
  std::vector<int> handed{memfd, uffd};
  if (async_mode) {
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    check_sys(pagemap, "open(/proc/self/pagemap)");
    handed.push_back(pagemap);
  }
  auto put = side.call(async_mode ? R"({"op":"put_fds","kind":"memfd+uffd+pagemap"})"
                                  : R"({"op":"put_fds","kind":"memfd+uffd"})",
                       handed);
  for (int f : handed) close(f);
  const std::string ticket = put.fields().at("ticket").string_value();

  // 4. gRPC over the Unix socket, the token as a bearer credential on every call.
  auto channel = grpc::CreateChannel("unix:" + grpc_socket, grpc::InsecureChannelCredentials());
  auto stub = devrep::v1::DevrepService::NewStub(channel);
  auto ctx = [&token](int seconds = 30) {
    auto c = std::make_unique<grpc::ClientContext>();
    c->AddMetadata("authorization", "Bearer " + token);
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
    return c;
  };
  {
    devrep::v1::RegisterRegionRequest req;
    req.set_name(name);
    req.mutable_memfd()->set_fd_ticket(ticket);
    req.mutable_memfd()->set_nbytes(nbytes);
    req.mutable_memfd()->set_writer_base(reinterpret_cast<uint64_t>(host));
    req.set_tracking(async_mode ? devrep::v1::TRACKING_MODE_ASYNC : devrep::v1::TRACKING_MODE_SYNC);
    devrep::v1::RegisterRegionResponse resp;
    check_grpc(stub->RegisterRegion(ctx().get(), req, &resp), "RegisterRegion");
  }
  int64_t replicated_pages = -1;
  {
    devrep::v1::ReplicateRequest req;
    req.set_name(name);
    req.add_devices("cpu:0");
    auto c = ctx();
    auto reader = stub->Replicate(c.get(), req);
    devrep::v1::ReplicateResponse msg;
    while (reader->Read(&msg))
      if (msg.has_report()) replicated_pages = msg.report().pages_copied();
    check_grpc(reader->Finish(), "Replicate");
  }

  // 5. A host write. Sync: the page is write-protected, the store faults, the server invalidates the page in every
  //    replica, un-protects it and wakes us. Async: the kernel marks the page written; the fresh acquire below
  //    collects it. No Invalidate call either way.
  std::memset(host + written_page * kPage, 0x5A, kPage);

  // 6. A fresh acquire (waits until every page is valid again), the replica fd on the side channel, compare.
  devrep::v1::AcquireResponse lease;
  {
    devrep::v1::AcquireRequest req;
    req.set_name(name);
    req.set_device("cpu:0");
    req.set_fresh(true);
    req.set_timeout_ms(20000);
    check_grpc(stub->Acquire(ctx().get(), req, &lease), "Acquire");
  }
  if (lease.export_kind() != "fd") die("cpu:0 replica exports " + lease.export_kind() + ", expected fd");
  std::vector<int> fds;
  side.call(R"({"op":"lease_fd","lease":)" + std::to_string(lease.lease_id()) + "}", {}, &fds);
  if (fds.size() != 1) die("lease_fd returned " + std::to_string(fds.size()) + " fds");
  size_t map_len = lease.buffer_nbytes() ? lease.buffer_nbytes() : nbytes;
  // The replica memfd is sealed F_SEAL_FUTURE_WRITE: only a read-only mapping is possible.
  auto* replica = static_cast<uint8_t*>(mmap(nullptr, map_len, PROT_READ, MAP_SHARED, fds[0], 0));
  if (replica == MAP_FAILED) die(std::string("mmap(replica): ") + std::strerror(errno));
  close(fds[0]);
  bool equal = std::memcmp(replica, host, nbytes) == 0;
  bool page_fresh = replica[written_page * kPage] == 0x5A && replica[written_page * kPage + kPage - 1] == 0x5A;
  uint64_t digest = fnv1a(replica, nbytes);
  munmap(replica, map_len);
  {
    devrep::v1::ReleaseRequest req;
    req.set_lease_id(lease.lease_id());
    devrep::v1::ReleaseResponse resp;
    check_grpc(stub->Release(ctx().get(), req, &resp), "Release");
  }
  devrep::v1::DescribeRegionResponse desc;
  {
    devrep::v1::DescribeRegionRequest req;
    req.set_name(name);
    check_grpc(stub->DescribeRegion(ctx().get(), req, &desc), "DescribeRegion");
  }

  // 7. Let another client (the test, in Python) check the same replica, then end the session.
  {
    devrep::v1::ShareRegionRequest req;
    req.set_name(name);
    req.set_grantee("*");
    devrep::v1::ShareRegionResponse resp;
    check_grpc(stub->ShareRegion(ctx().get(), req, &resp), "ShareRegion");
  }
  std::printf("{\"replicated_pages\": %lld, \"generation\": %llu, \"tracking\": \"%s\", \"equal\": %s, "
              "\"page_fresh\": %s, \"fnv1a\": \"%016llx\", \"nbytes\": %zu}\n",
              static_cast<long long>(replicated_pages), static_cast<unsigned long long>(lease.generation()),
              desc.region().tracking().c_str(), equal ? "true" : "false", page_fresh ? "true" : "false",
              static_cast<unsigned long long>(digest), nbytes);
  std::fflush(stdout);
  char line[64];
  while (std::fgets(line, sizeof line, stdin)) {
  }
  side.call(R"({"op":"bye"})", {});
  munmap(host, nbytes);
  return equal && page_fresh ? 0 : 1;
}
